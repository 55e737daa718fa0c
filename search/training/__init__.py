"""The training plane: trials and final trainings on a device. Only it imports torch;
the control plane (the rest of search/) imports it inside the function that trains."""
