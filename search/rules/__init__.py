"""The study's rules: space, config, budget and tickets, settings, pruners, cost, fidelity,
attribute names. Torch-free; imports neither the training plane nor the commands."""
