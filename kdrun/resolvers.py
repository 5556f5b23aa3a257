"""OmegaConf resolvers the shipped recipes use for protocol values that depend on the chosen models.

`${kdrun.repdistiller_lr:${student.name}}` is RepDistiller's learning rate for that model and
`${kdrun.dkd_beta:${method.name},${teacher.name},${student.name}}` mdistiller's DKD beta for that pair, so that
`kdrun +experiment=repdistiller_cifar100 method=dkd teacher=resnet56 student=resnet20` runs the published
protocol without hand-set values; `kdrun.recipe_lr`/`kdrun.recipe_epochs` give MLKD its own lr and epochs there,
and `kdrun.reviewkd_beta` is ReviewKD's default weight for the pair. They are registered wherever the config is composed
(`kdrun.config_store.register_model_groups`); Hydra hands registered resolvers on to joblib and submitit
workers with its singleton state.
"""
from __future__ import annotations

from omegaconf import OmegaConf

from kdrun.imagenet_protocol import imagenet_method_key

# RepDistiller train_student.py and train_teacher.py: `if model in ['MobileNetV2', 'ShuffleV1', 'ShuffleV2']:
# learning_rate = 0.01` (else the --learning_rate default 0.05). Its MobileNetV2 is mobile_half (width 0.5).
REPDISTILLER_LR = 0.05
REPDISTILLER_LOW_LR = 0.01
REPDISTILLER_LOW_LR_MODELS = ("mobilenetv2", "mobilenetv2_half", "shufflenetv1", "shufflenetv2")

# mdistiller configs/cifar100/dkd/<teacher>_<student>.yaml, DKD.BETA; the files that set none use
# mdistiller/engine/cfg.py's CFG.DKD.BETA = 8.0 (res32x4_res8x4, res32x4_shuv1, res32x4_shuv2, res50_mv2,
# wrn40_2_shuv1).
DKD_DEFAULT_BETA = 8.0
DKD_BETA = {
    ("resnet56", "resnet20"): 2.0,       # res56_res20.yaml
    ("resnet110", "resnet32"): 2.0,      # res110_res32.yaml
    ("wrn_40_2", "wrn_16_2"): 6.0,       # wrn40_2_wrn_16_2.yaml
    ("wrn_40_2", "wrn_40_1"): 6.0,       # wrn40_2_wrn_40_1.yaml
    ("vgg13", "vgg8"): 6.0,              # vgg13_vgg8.yaml
    ("vgg13", "mobilenetv2"): 6.0,       # vgg13_mv2.yaml (mdistiller's MobileNetV2 is mobile_half)
    ("vgg13", "mobilenetv2_half"): 6.0,
}


def repdistiller_lr(model: str) -> float:
    """RepDistiller's initial learning rate for `model`, as a student and as a teacher."""
    return REPDISTILLER_LOW_LR if str(model) in REPDISTILLER_LOW_LR_MODELS else REPDISTILLER_LR


def dkd_beta(method: str, teacher: str, student: str, logit_standardize=False) -> float | None:
    """mdistiller's DKD beta (NCKD weight) for the pair, or that of logit standardization's runs when it is on;
    None for methods other than dkd, which have no such key of their own."""
    if str(method) != "dkd":
        return None
    pair = (str(teacher), "mobilenetv2" if str(student) == "mobilenetv2_half" else str(student))
    if logit_standardize is True and pair in LS_DKD_BETA:
        return LS_DKD_BETA[pair]
    return DKD_BETA.get((str(teacher), str(student)), DKD_DEFAULT_BETA)


# ReviewKD's weight (--kd-loss-weight) per pair: the authors' CIFAR-100/script/reviewKD.sh (dvlab-research/ReviewKD);
# the pairs it does not list get its usual 5.0, also mdistiller's configs/cifar100/reviewkd.yaml REVIEWKD_WEIGHT.
REVIEWKD_DEFAULT_BETA = 5.0
REVIEWKD_BETA = {
    ("resnet32x4", "shufflenetv2"): 8.0,
    ("resnet56", "resnet20"): 0.6,
    ("resnet110", "resnet32"): 1.0,
}

# MLKD's protocol (Jin-Ying/Multi-Level-Logit-Distillation configs/cifar100/ours/*.yaml): lr 0.025, or 0.01 for
# MobileNetV2 and ShuffleNet students; 240 epochs, longer for the pairs below; the lr decay stays at 150/180/210.
MLKD_LR = 0.025
MLKD_EPOCHS = {
    ("resnet32x4", "shufflenetv1"): 960,    # res32x4_shuv1.yaml
    ("resnet32x4", "shufflenetv2"): 960,    # res32x4_shuv2.yaml
    ("resnet50", "mobilenetv2"): 480,       # res50_mv2.yaml (its MobileNetV2 is mobile_half)
    ("resnet50", "mobilenetv2_half"): 480,
    ("vgg13", "mobilenetv2"): 480,          # vgg13_mv2.yaml
    ("vgg13", "mobilenetv2_half"): 480,
    ("wrn_40_2", "shufflenetv1"): 480,      # wrn40_2_shuv1.yaml
}
REPDISTILLER_EPOCHS = 240


def reviewkd_beta(teacher: str, student: str) -> float:
    """The authors' ReviewKD weight for the pair (conf/method/reviewkd.yaml's default beta)."""
    return REVIEWKD_BETA.get((str(teacher), str(student)), REVIEWKD_DEFAULT_BETA)


def recipe_lr(method: str, student: str) -> float:
    """The benchmark recipe's student lr: MLKD's own for mlkd, else RepDistiller's for the student."""
    if str(method) == "mlkd" and str(student) not in REPDISTILLER_LOW_LR_MODELS:
        return MLKD_LR
    return repdistiller_lr(student)


def recipe_teacher_epochs(method: str, teacher: str, student: str, epochs: int) -> int:
    """The teacher's epochs under the recipe: the student's (as everywhere), except that MLKD's longer student
    runs keep RepDistiller's 240-epoch teacher (the one every other method of the pair distils from)."""
    if str(method) == "mlkd" and int(epochs) == recipe_epochs(method, teacher, student):
        return REPDISTILLER_EPOCHS
    return int(epochs)


def recipe_epochs(method: str, teacher: str, student: str) -> int:
    """The benchmark recipe's epochs: MLKD's longer runs for some pairs, else RepDistiller's 240."""
    if str(method) == "mlkd":
        return MLKD_EPOCHS.get((str(teacher), str(student)), REPDISTILLER_EPOCHS)
    return REPDISTILLER_EPOCHS


# Logit standardization's per-pair settings: the official logs of sunshangquan/logit-standardization-KD are named
# `TYPE,TEACHER,STUDENT,BASE_TEMP,KD_WEIGHT[,DKD_BETA]` (its README); the pairs without a log get its README
# command's --base-temp 2 --kd-weight 9. Its MobileNetV2 is mobile_half: both kdrun widths get its values.
LS_DEFAULT = (2.0, 9.0)
LS_PAIRS = {
    "kd": {("resnet50", "mobilenetv2"): (3.0, 1.0), ("resnet110", "resnet20"): (4.0, 12.0),
           ("resnet32x4", "wrn_16_2"): (3.0, 9.0), ("resnet32x4", "wrn_40_2"): (3.0, 9.0),
           ("vgg13", "mobilenetv2"): (3.0, 9.0), ("vgg13", "vgg8"): (3.0, 9.0), ("wrn_40_2", "mobilenetv2"): (3.0, 9.0)},
    "dkd": {("resnet50", "mobilenetv2"): (2.0, 15.0), ("resnet110", "resnet20"): (2.0, 15.0),
            ("resnet110", "resnet32"): (2.0, 15.0), ("resnet56", "resnet20"): (3.0, 18.0),
            ("vgg13", "mobilenetv2"): (3.0, 9.0), ("vgg13", "vgg8"): (2.0, 15.0),
            ("wrn_40_2", "mobilenetv2"): (2.0, 15.0), ("wrn_40_2", "resnet8x4"): (2.0, 18.0),
            ("wrn_40_2", "wrn_16_2"): (2.0, 12.0), ("wrn_40_2", "wrn_40_1"): (2.0, 12.0)},
    "mlkd": {("resnet32x4", "shufflenetv2"): (2.0, 6.0), ("vgg13", "mobilenetv2"): (2.0, 6.0),
             ("vgg13", "vgg8"): (2.0, 6.0)},
}
# The third value of its DKD logs: DKD's beta in those runs, where it differs from mdistiller's (DKD_BETA).
LS_DKD_BETA = {("resnet50", "mobilenetv2"): 2.0, ("resnet110", "resnet20"): 2.0, ("resnet110", "resnet32"): 2.0,
               ("resnet32x4", "wrn_16_2"): 2.0, ("resnet32x4", "wrn_40_2"): 8.0, ("resnet56", "resnet20"): 2.0,
               ("vgg13", "mobilenetv2"): 2.0, ("vgg13", "vgg8"): 2.0, ("wrn_40_2", "mobilenetv2"): 2.0,
               ("wrn_40_2", "resnet8x4"): 2.0, ("wrn_40_2", "wrn_16_2"): 2.0, ("wrn_40_2", "wrn_40_1"): 2.0}


def ls_pair(method: str, teacher: str, student: str) -> tuple[float, float]:
    student = "mobilenetv2" if str(student) == "mobilenetv2_half" else str(student)
    return LS_PAIRS.get(str(method), {}).get((str(teacher), student), LS_DEFAULT)


def ls_base_T(method: str, teacher: str, student: str) -> float:
    """Logit standardization's base temperature for the pair (a logit method's default `base_T`)."""
    return ls_pair(method, teacher, student)[0]


def ls_weight(method: str, teacher: str, student: str) -> float:
    """Logit standardization's KD weight for the pair (a logit method's default `ls_weight`)."""
    return ls_pair(method, teacher, student)[1]


# A sweep job's folder is named by its overrides; past this many characters (file names stop at 255 bytes)
# it keeps their start and a hash of the whole, so a long sweep still gets one folder per job.
JOB_DIRNAME_LIMIT = 150


def job_dirname(overrides: str) -> str:
    """`${kdrun.job_dirname:${hydra.job.override_dirname}}`: the overrides, shortened when too long."""
    import hashlib
    import re

    text = re.sub(r"='(true|false)'(?=,|$)", r"=\1", str(overrides))  # compile='true' (quoted for Hydra): compile=true
    if len(text.encode()) <= JOB_DIRNAME_LIMIT:
        return text
    digest = hashlib.sha256(text.encode()).hexdigest()[:10]
    return f"{text.encode()[:JOB_DIRNAME_LIMIT - 12].decode(errors='ignore')}_{digest}"


def gpus_per_job() -> int:
    """`${kdrun.gpus_per_job:}` (conf/hydra/launcher/ray.yaml): a GPU for each Ray job when this machine has one."""
    import torch

    return 1 if torch.cuda.is_available() else 0


RESOLVERS = {"kdrun.repdistiller_lr": repdistiller_lr, "kdrun.dkd_beta": dkd_beta, "kdrun.job_dirname": job_dirname,
             "kdrun.reviewkd_beta": reviewkd_beta, "kdrun.recipe_lr": recipe_lr, "kdrun.recipe_epochs": recipe_epochs,
             "kdrun.recipe_teacher_epochs": recipe_teacher_epochs,
             "kdrun.ls_base_T": ls_base_T, "kdrun.ls_weight": ls_weight, "kdrun.gpus_per_job": gpus_per_job,
             "kdrun.imagenet_method": imagenet_method_key}


def register_resolvers() -> None:
    """Register the `kdrun.*` resolvers (again: a no-op)."""
    for name, function in RESOLVERS.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, function)
