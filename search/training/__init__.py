"""The training plane: trials and final trainings on a device. Imports the rules, never the
commands; only it imports torch, and only in the modules that train."""
