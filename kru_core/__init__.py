"""kru_core: Kronecker Recurrent Units in pure PyTorch (the model library)."""

from .klstm import KLSTM
from .kron import factorize, kron_matvec, unitary_penalty
from .kru import KRU, KRUCell
from .models import SequenceModel

__all__ = [
    "KLSTM",
    "KRU",
    "KRUCell",
    "SequenceModel",
    "factorize",
    "kron_matvec",
    "unitary_penalty",
]
