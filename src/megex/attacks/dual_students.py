"""Dual students (Beetham et al., ICLR 2023): two clones ("students") learn the victim's
answers, and the generator, without queries, maximises how far apart their logits are:

    D(x) = mean over images and classes of |student_1(x) - student_2(x)|

(the mean over pairs of students, with more than two). What is evaluated is the first
student (the authors' default way of reading one model out of several; with its weight
average, which their code keeps and the shared `clone_ema` gives).

It is DisGUIDE's loop (:mod:`.disguide`) with another discrepancy, no class-diversity term
and the first student evaluated: the two papers differ in these terms alone (both train the
clones on the victim's answers to generated images with the soft-label L1 loss, and train
the generator on the clones without querying), so this attack is DisGUIDE with those
defaults, under its own name.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..settings import override
from .disguide import DisGUIDE, DisGUIDEConfig

__all__ = ["DualStudents", "DualStudentsConfig"]


@dataclass(frozen=True)
class DualStudentsConfig(DisGUIDEConfig):
    discrepancy: str = override(DisGUIDEConfig, "discrepancy", "logit_l1")
    evaluated: str = override(DisGUIDEConfig, "evaluated", "first")
    class_balance: float = override(DisGUIDEConfig, "class_balance", 0.0)


class DualStudents(DisGUIDE):
    name = "dual-students"
    config_class = DualStudentsConfig
