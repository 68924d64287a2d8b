"""SequenceModel: input map, one recurrent layer (KRU, KRU-LSTM or a torch.nn baseline), readout.

.. math::
    h_t = \\text{cell}(h_{t-1}, x_t), \\qquad \\hat y_t = V [\\operatorname{Re} h_t;
    \\operatorname{Im} h_t] + c

(paper eqs. 1-2; the readout acts on ``2N`` real numbers for complex states, paper 1.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .config import CELL_KINDS, ModelConfig
from .klstm import KLSTM
from .kru import KRU, check_positive_int, resolve_dtypes
from .recurrence import check_backend
from .tasks import TaskInfo

__all__ = ["CELLS", "HEADS", "SequenceModel"]

#: Recurrent cells: KRU, KRU-LSTM and the ``torch.nn`` baselines (tanh RNN, LSTM).
CELLS = CELL_KINDS
#: Readout heads: logits for every step, or for each sequence's last valid step.
HEADS = ("per_step", "last")


class SequenceModel(nn.Module):
    """A recurrent sequence model: input map, one recurrent layer and a linear readout.

    * ``cell="kru"``: :class:`~kru_core.KRU`; its complex input map ``U`` is the input
      projection (for token inputs, an embedding lookup of ``U``'s columns, no one-hot).
    * ``cell="kru_lstm"``: :class:`~kru_core.KLSTM` (real), token inputs likewise looked up.
    * ``cell="rnn"`` / ``"lstm"``: ``torch.nn.RNN`` (tanh) / ``torch.nn.LSTM``; token inputs are
      one-hot encoded (so the input matrix is ``N × vocab``, as the paper counts it).

    The readout is ``nn.Linear`` on ``[Re h; Im h]`` (``2N`` features) for complex states and on
    ``h`` otherwise.

    Parameter layout of the pixel-MNIST model (``cell="kru"``, ``input_size=1``,
    ``output_size=10``, ``hidden_size=512``, defaults): 72 (nine complex 2×2 factors)
    + 1,024 (complex ``U``) + 512 (modReLU bias, the only hidden bias: uRNN's layout)
    + 10,250 (readout ``10 × 1024 + 10``) = **11,858** real parameters (the paper: "≈11K";
    its inferred 11,346 has no hidden bias at all).

    Args:
        cell: ``"kru"``, ``"kru_lstm"``, ``"rnn"`` or ``"lstm"``.
        hidden_size: ``N``.
        output_size: logits per prediction.
        vocab_size: token inputs (``LongTensor (B, T)`` below ``vocab_size``), or
        input_size: feature inputs (``(B, T, input_size)`` float); exactly one of the two.
        head: ``"per_step"`` (logits ``(B, T, output_size)``) or ``"last"`` (``(B,
            output_size)`` read at each sequence's last valid step).
        factors: Kronecker factor sizes (``kru`` and ``kru_lstm`` only).
        complex: complex KRU (``kru`` only; the other cells are real and ignore it).
        activation: KRU nonlinearity (``kru`` only).
        strategy: KRU/KRU-LSTM execution strategy (see :func:`~kru_core.kron.plan_recurrence`).
        backend: which implementation runs the KRU recurrence (:mod:`kru_core.recurrence`:
            ``"auto"``, ``"eager"``, ``"cpu"``, ``"triton"``); ``kru`` and ``kru_lstm`` only (the
            ``torch.nn`` baselines run PyTorch's own kernels and ignore it). It does not change
            the parameters, so a checkpoint loads with any backend.
        device, dtype: factory kwargs; ``dtype`` is the real dtype (default float32, states then
            complex64).

    Inputs: x, lengths, hx
        - **x**: ``(B, T)`` token ids or ``(B, T, input_size)`` features.
        - **lengths**: optional ``(B,)`` valid lengths (``1..T``) of a right-padded batch.
        - **hx**: the hidden state to start from: exactly what a previous ``forward`` returned
          (a tensor for ``kru`` and ``rnn``, a tuple ``(h, c)`` for ``kru_lstm`` and ``lstm``);
          ``None`` for zeros. Lets text generation feed one token at a time.

    Outputs: logits, state
        - **logits**: ``(B, T, output_size)`` or ``(B, output_size)`` (``head="last"``).
        - **state**: the final hidden state, in the form ``hx`` accepts: ``(B, N)`` for
          ``kru``, ``(1, B, N)`` for ``rnn``, ``(h, c)`` for ``kru_lstm`` (``(B, N)`` each) and
          ``lstm`` (``(1, B, N)`` each). With ``lengths`` it is each sequence's state after its
          last valid step.

    Example::

        >>> model = SequenceModel(cell="kru", input_size=1, hidden_size=512, output_size=10,
        ...                       head="last")
        >>> model.parameter_counts()
        {'total': 11858, 'recurrent': 72}
        >>> logits, h = model(torch.rand(2, 784, 1))
        >>> logits.shape
        torch.Size([2, 10])
    """

    def __init__(
        self,
        *,
        cell: str,
        hidden_size: int,
        output_size: int,
        vocab_size: int | None = None,
        input_size: int | None = None,
        head: str = "per_step",
        factors: Sequence[int | Sequence[int]] | None = None,
        complex: bool = True,
        activation: str = "modrelu",
        strategy: str = "auto",
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"cell: expected one of {CELLS}, got {cell!r}")
        if head not in HEADS:
            raise ValueError(f"head: expected one of {HEADS}, got {head!r}")
        if (vocab_size is None) == (input_size is None):
            raise ValueError(
                f"vocab_size, input_size: expected exactly one of them, got "
                f"vocab_size={vocab_size!r}, input_size={input_size!r}"
            )
        if vocab_size is not None:
            in_dim = check_positive_int("vocab_size", vocab_size)
        else:
            in_dim = check_positive_int("input_size", input_size)
        self.hidden_size = check_positive_int("hidden_size", hidden_size)
        self.output_size = check_positive_int("output_size", output_size)
        if factors is not None and cell in ("rnn", "lstm"):
            raise ValueError(f"factors: expected None for cell={cell!r}, got {factors!r}")
        self.cell = cell
        self.backend = check_backend(backend)
        self.head = head
        self.vocab_size = vocab_size
        self.input_size = input_size
        real_dtype, _ = resolve_dtypes(dtype, cell == "kru" and complex)
        self.complex_state = cell == "kru" and complex
        kw: dict[str, Any] = {"device": device, "dtype": real_dtype}
        self.rnn: nn.Module
        # What the two Kronecker cells take alike.
        kron_kw: dict[str, Any] = {
            "factors": factors,
            "batch_first": True,
            "strategy": strategy,
            "backend": backend,
            **kw,
        }
        if cell == "kru":
            self.rnn = KRU(in_dim, hidden_size, complex=complex, activation=activation, **kron_kw)
        elif cell == "kru_lstm":
            self.rnn = KLSTM(in_dim, hidden_size, **kron_kw)
        elif cell == "rnn":
            self.rnn = nn.RNN(in_dim, hidden_size, nonlinearity="tanh", batch_first=True, **kw)
        else:
            self.rnn = nn.LSTM(in_dim, hidden_size, batch_first=True, **kw)
        features = 2 * hidden_size if self.complex_state else hidden_size
        self.readout = nn.Linear(features, output_size, **kw)
        nn.init.xavier_uniform_(self.readout.weight)
        nn.init.zeros_(self.readout.bias)

    # ------------------------------------------------------------------ parameters
    def factor_parameters(self) -> list[nn.Parameter]:
        """The Kronecker factors (empty for ``rnn``/``lstm``), for their own optimizer group."""
        if self.cell in ("kru", "kru_lstm"):
            return list(self.rnn.recurrent_factors)
        return []

    def constrain_(self) -> None:
        """Project parameters back into their domain after an optimizer step (KRU's modReLU
        bias to ``b <= 0``); the training engine calls it after every update."""
        constrain = getattr(self.rnn, "constrain_", None)
        if constrain is not None:
            constrain()

    def unitary_penalty(self) -> Tensor:
        """``sum_f ||W_f^H W_f - I||_F^2`` for ``kru``; a 0-dim zero for the other cells (the
        paper does not constrain KRU-LSTM)."""
        if self.cell == "kru":
            return self.rnn.unitary_penalty()
        w = self.readout.weight
        return torch.zeros((), dtype=w.dtype, device=w.device)

    def parameter_counts(self) -> dict[str, int]:
        """``{"total": ..., "recurrent": ...}`` in real scalars (a complex entry counts 2).

        ``recurrent`` is the factors for ``kru``/``kru_lstm`` and ``weight_hh`` for the
        baselines (the paper's "# params recurrent").
        """
        total = sum(p.numel() * (2 if p.is_complex() else 1) for p in self.parameters())
        if self.cell in ("kru", "kru_lstm"):
            recurrent = self.rnn.num_recurrent_parameters()
        else:
            recurrent = self.rnn.weight_hh_l0.numel()
        return {"total": total, "recurrent": recurrent}

    def extra_repr(self) -> str:
        inp = (
            f"vocab_size={self.vocab_size}"
            if self.vocab_size is not None
            else f"input_size={self.input_size}"
        )
        return f"cell={self.cell!r}, {inp}, head={self.head!r}"

    # ------------------------------------------------------------------ forward
    def _check_inputs(self, x: Tensor, lengths: Tensor | None) -> None:
        if self.vocab_size is not None:
            if x.dim() != 2 or x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
                raise ValueError(
                    f"x: expected (B, T) integer token ids, got shape {tuple(x.shape)} "
                    f"dtype {x.dtype}"
                )
        elif x.dim() != 3 or x.shape[-1] != self.input_size or not x.is_floating_point():
            raise ValueError(
                f"x: expected (B, T, {self.input_size}) float features, got shape "
                f"{tuple(x.shape)} dtype {x.dtype}"
            )
        if x.shape[1] == 0:
            raise ValueError("x: expected at least one time step, got 0")
        if lengths is not None:
            if lengths.shape != (x.shape[0],) or lengths.is_floating_point():
                raise ValueError(
                    f"lengths: expected a ({x.shape[0]},) integer tensor, got shape "
                    f"{tuple(lengths.shape)} dtype {lengths.dtype}"
                )
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 1 or hi > x.shape[1]:
                raise ValueError(
                    f"lengths: expected values in 1..{x.shape[1]}, got min {lo}, max {hi}"
                )

    def forward(
        self, x: Tensor, *, lengths: Tensor | None = None, hx: Any = None
    ) -> tuple[Tensor, Any]:
        self._check_inputs(x, lengths)
        batch, steps = x.shape[:2]
        ragged = lengths is not None and bool((lengths != steps).any())
        last = None if not ragged else (lengths.to(x.device) - 1)
        rows = torch.arange(batch, device=x.device)
        if self.cell in ("rnn", "lstm") and self.vocab_size is not None:
            x = nn.functional.one_hot(x, self.vocab_size).to(self.readout.weight.dtype)
        if self.cell == "kru":
            out, state = self.rnn(x, hx)
            if last is not None:
                state = out[rows, last]
        elif self.cell == "kru_lstm":
            out, state = self.rnn(x, hx, lengths=lengths if ragged else None)
        elif self.cell == "rnn":
            out, state = self.rnn(x, hx)
            if last is not None:
                state = out[rows, last].unsqueeze(0)
        else:
            out, state = self._run_lstm(x, hx, lengths if ragged else None)
        if self.head == "last":
            out = out[:, -1] if last is None else out[rows, last]
        if self.complex_state:
            out = torch.cat([out.real, out.imag], dim=-1)
        return self.readout(out), state

    def _run_lstm(
        self, x: Tensor, hx: Any, lengths: Tensor | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if lengths is None:
            return self.rnn(x, hx)
        packed = nn.utils.rnn.pack_padded_sequence(
            x, lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        out, state = self.rnn(packed, hx)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out, state


def resolve_activation(model_config: ModelConfig, task_info: TaskInfo) -> str:
    """``model.activation``, with ``auto`` resolved for the task: ``split_relu`` for ``adding``
    (it learns the gating much faster), ``modrelu`` otherwise (split ReLU cannot hold the copy
    task's memory); the runs that decided it are in ``docs/results.md``."""
    if model_config.activation != "auto":
        return model_config.activation
    return "split_relu" if task_info.task_kind == "adding" else "modrelu"


def build_model(
    model_config: ModelConfig, task_info: TaskInfo, *, device: torch.device | str | None = None
) -> SequenceModel:
    """The :class:`~kru_core.models.SequenceModel` for a model config and a task."""
    inputs: dict[str, Any] = (
        {"vocab_size": task_info.vocab_size}
        if task_info.input_kind == "tokens"
        else {"input_size": task_info.input_size}
    )
    return SequenceModel(
        cell=model_config.cell,
        hidden_size=model_config.hidden_size,
        output_size=task_info.output_size,
        head=task_info.head,
        factors=None if model_config.factors is None else list(model_config.factors),
        complex=model_config.complex,
        activation=resolve_activation(model_config, task_info),
        backend=model_config.backend,
        device=device,
        **inputs,
    )
