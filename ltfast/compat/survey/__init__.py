"""Drop-ins for the loss files of the survey's ``Main-codebase`` (Vanint/Awesome-LongTailed-Learning,
a fork of hyperconnect/LADE), one module per file, same names, same ``create_loss`` factories:

=========================  ==========================================================
``./loss/<file>.py``        ltfast replacement
=========================  ==========================================================
SoftmaxLoss.py             :class:`SoftmaxLoss` (``nn.CrossEntropyLoss()``)
WeightedSoftmaxLoss.py     :class:`WeightedSoftmaxLoss` (``w_c = 1 + ln(n_max / n_c)``)
PriorCELoss.py             :class:`PriorCELoss` (Balanced Softmax / LADE-CE)
LADELoss.py                :class:`LADELoss` (the LADER regulariser)
SEQLLoss.py                :class:`SEQL` (softmax equalization loss)
FocalLoss.py               :class:`FocalLoss` (detached modulating factor)
=========================  ==========================================================

In a YAML, replace ``def_file: ./loss/PriorCELoss.py`` by the path ``def_file("PriorCELoss")``
returns (``python -c "import ltfast.compat.survey as s; print(s.def_file('PriorCELoss'))"``).
"""
from ltfast.compat.survey._utils import IMAGENET_LT_TRAIN_TXT, MODULES, calculate_prior, def_file
from ltfast.compat.survey.FocalLoss import FocalLoss
from ltfast.compat.survey.LADELoss import LADELoss
from ltfast.compat.survey.PriorCELoss import PriorCELoss
from ltfast.compat.survey.SEQLLoss import SEQL
from ltfast.compat.survey.SoftmaxLoss import SoftmaxLoss
from ltfast.compat.survey.WeightedSoftmaxLoss import WeightedSoftmaxLoss

__all__ = ["SoftmaxLoss", "WeightedSoftmaxLoss", "PriorCELoss", "LADELoss", "SEQL", "FocalLoss",
           "calculate_prior", "def_file", "MODULES", "IMAGENET_LT_TRAIN_TXT"]
