"""Names of the attributes this project stores on studies and trials, written once.

The objective writes the trial attributes; status, export, report and the dashboard note
read them through these names.
"""

# Study user attributes.
SETTINGS = "hpo:settings"  # StudySettings.to_dict(), written last when a study is created
TARGET = "hpo:target"  # finished trials the study should hold
TARGET_RAISED = "hpo:target-raised-to-"  # + N: one per raise; the target is the largest
# + a creator's token: the settings that creator proposes (search/rules/study.py)
PROPOSED_SETTINGS = "hpo:settings-proposed-by-"
FINAL = "hpo:final"  # the latest `hpo train` of a config exported from this study
COMPARE = "hpo:compare"  # the latest `hpo compare`: its whole table (search/commands/compare.py)
# The latest `hpo ablate --measure`: its table and markdown (search/commands/ablation.py)
ABLATION = "hpo:ablation"
# + a worker's name: its latest environment fault, {"at": UTC time, "what": one line}
MACHINE_FAULT = "hpo:machine-fault:"
# MLflow (search/training/trackers.py): the study's experiment id and its parent run's id.
MLFLOW_EXPERIMENT = "hpo:mlflow-experiment"
MLFLOW_PARENT_RUN = "hpo:mlflow-parent-run"
# + a chain's first trial number: its run, where the run was made after its trial ended
MLFLOW_CHAIN_RUN = "hpo:mlflow-run:"

# Trial user attributes.
CONFIG = "config"  # TrialConfig.to_dict()
ARCHITECTURE = "architecture"  # one line: N, K, channels, kernel, dropout
RECIPE = "recipe"  # one line: optimizer and the recipe levers on (config.describe_recipe)
PARAMS = "params"
DEVICE = "device"
HOST = "host"
GPU = "gpu"
WORKER = "worker"
EPOCHS = "epochs"  # one record per epoch trained
BEST_VAL_LOSS = "best_val_loss"
VAL_ACC = "val_acc"
IMAGES_PER_S = "images_per_s"
RESUMED_FROM_EPOCH = "resumed_from_epoch"
CREATOR = "hpo:creator"  # on a study's first ticket: the token of the creator whose settings hold
CHECKPOINT = "checkpoint"  # the artifact holding the trial's latest epoch checkpoint
FAIL_REASON = "fail_reason"
# Numbers of the chain's trials that ran out of device memory (a retry inherits the list).
OUT_OF_MEMORY = "out_of_memory_trials"
OUT_OF_MEMORY_PREFIX = "OutOfMemoryError: "  # such a FAIL_REASON: retried once, at its params
STOPPED_PREFIX = "interrupted: "  # such a FAIL_REASON: a stop, re-queued, not a failure
GFLOPS = "gflops_per_image"  # train FLOPs per image of the drawn network
OVER_CAP = "over_cap"  # True: over the space's max_gflops, skipped untrained, not in the budget
SECONDS = "seconds"  # the trial's time by phase, TRIAL_PHASES -> seconds
MLFLOW_RUN = "mlflow_run_id"  # the MLflow run of the trial's chain (a retry inherits it)

# The phases of a trial, as SECONDS records them. sample: the sampler's suggest calls; build:
# model, loaders, optimizer (and a retry's checkpoint load); compile: first calls of compiled
# steps; train, eval: epochs less compiling; checkpoint: the training thread's part (copy to
# host, waiting for the write); report: reports and attributes; prune: should_prune.
TRIAL_PHASES = ("sample", "build", "compile", "train", "eval", "checkpoint", "report", "prune")

# What every trial carries, as listed in the dashboard's study note.
DESCRIBED = (VAL_ACC, IMAGES_PER_S, PARAMS, GFLOPS, ARCHITECTURE, RECIPE, CONFIG, GPU, HOST)
