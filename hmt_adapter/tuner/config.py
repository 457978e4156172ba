"""Configuration of the HMT adapter."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import ClassVar, Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils import SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME, PeftType

from . import _peft_shim  # noqa: F401  (adds PeftType.HMT before any config is built)
from .weights import check_adapter_weights

RECALL_QUERIES = ("segment", "previous")
RECALL_SCALES = ("constant", "log_n")
AUTO_INIT_TEXT = "auto"  # hmt-adapter train: the write token starts at the prompts' most common last token
WRITE_TOKENS = ("memory", "learned")
LOSS_SCOPES = ("all", "last_segment")


@dataclass
class HMTConfig(PeftConfig):
    """Configuration of a Hierarchical Memory Transformer (HMT, arXiv 2405.06067) adapter.

    HMT lets a frozen causal LM read an input of any length segment by segment. Every segment pass sees
    ``[memory ; sensory ; segment ; memory]``: a memory embedding recalled from the cache of past segment
    memories, the last ``num_sensory`` token embeddings of the previous segment, the ``segment_length`` new
    tokens, and the memory again at the write position, whose last-layer hidden state becomes the segment's
    memory embedding. The backbone therefore sees ``segment_length + num_sensory + 2`` positions.

    Example:
        ```py
        >>> import peft, hmt_adapter
        >>> config = hmt_adapter.HMTConfig(task_type="CAUSAL_LM", segment_length=256, num_sensory=32)
        >>> model = peft.get_peft_model(base_model, config)
        ```
    """

    segment_length: int = field(
        default=256,
        metadata={"help": "New tokens per segment. The paper uses 1024 for OPT-350M, 512 for OPT-2.7B, 256 for Llama-2-7B."},
    )
    num_sensory: int = field(
        default=32,
        metadata={"help": "Token embeddings of the previous segment prepended to each segment (sensory memory)."},
    )
    recall_window: int = field(
        default=300,
        metadata={"help": "Number of past memory embeddings kept for recall (long-term memory, N in the paper)."},
    )
    recall_dim: int = field(
        default=4096,
        metadata={"help": "Width h of the recall query/key projections W_q, W_k (d -> h)."},
    )
    summary_fraction: float = field(
        default=0.5,
        metadata={
            "help": "Fraction of a segment's tokens read by the summary pass that makes its recall query: "
            "ceil(segment_length * summary_fraction) tokens. Rounds up (the reference rounds half to even, so "
            "e.g. 0.5 of an odd segment length gives one token more here)."
        },
    )
    memory_projection: bool = field(
        default=True,
        metadata={
            "help": "Map memory embeddings back into the input-embedding space (rescale to the embeddings' typical "
            "norm, then a learned d x d projection initialised to the identity)."
        },
    )
    write_token: Literal["memory", "learned"] = field(
        default="learned",
        metadata={
            "help": "What sits at the write position whose hidden state becomes the segment's memory: 'learned' (the "
            "default: [m ; sensory ; x ; w], a learned write token w, the same for every segment) or 'memory' (the "
            "paper's [m ; sensory ; x ; m]: the memory just read, again). With a frozen backbone 'learned' lets the "
            "write position act as a fixed question to the segment while m carries what was remembered: every "
            "retrieving run in BENCHMARKS.md used it, and the paper's layout stayed at chance or learned to write "
            "only segment 0 with the same recipe."
        },
    )
    write_token_init_text: Optional[str] = field(
        default=None,
        metadata={
            "help": "Start the learned write token at the input embedding of the LAST token of this text (tokenized "
            "with tokenizer_name_or_path), as PEFT's prompt tuning starts from text: the words that come right "
            "before an answer in your prompts (' is' for '... The secret word is'). The write position then begins "
            "as a question to its segment, so its hidden state already holds what an answer would need and only "
            "the read has to be learned. None: the mean input embedding plus noise. Used only when the adapter is "
            "created for training (not when loading saved weights). Measured in BENCHMARKS.md. 'auto' (`hmt-adapter "
            "train` on prompt/completion data only): the most common last token of the training prompts."
        },
    )
    tokenizer_name_or_path: Optional[str] = field(
        default=None,
        metadata={"help": "The tokenizer of write_token_init_text (a Hub name or a local folder). `hmt-adapter "
                  "train` fills in the recipe's tokenizer."},
    )
    memory_gate: bool = field(
        default=False,
        metadata={
            "help": "Off by default. Gate the recalled memory with a learned scalar g, zero at init: segment n >= 1 reads "
            "m_0 + tanh(g) (recall - m_0), so training starts from what every segment reads at segment 0 and the "
            "recalled memory enters only as far as it helps (the zero-init gate of LLaMA-Adapter, PEFT's "
            "adaption_prompt, applied to HMT's read slot). Only with use_recall. Measured in BENCHMARKS.md: a closed "
            "gate can also keep the memory from starting to learn (it stayed near 0 on one of the runs), so it is "
            "off by default."
        },
    )
    recall_null: bool = field(
        default=False,
        metadata={
            "help": "Off by default (the paper's recall). A null slot in recall: one more entry, keyed by a learned "
            "vector n (W_k n) and valued m_0, so a segment whose query matches no memory better than the null key "
            "reads what segment 0 reads instead of the best-scoring distractor: a recall that can read nothing "
            "(do no harm when the answer is in the window). Only with use_recall. Measured in BENCHMARKS.md."
        },
    )
    recall_scale: Literal["constant", "log_n"] = field(
        default="constant",
        metadata={
            "help": "'constant': the paper's recall, softmax(q k^T / sqrt(h)). 'log_n': the scores are also multiplied "
            "by ln N, N the number of memories recalled over (the scalable softmax of length extrapolation), so the "
            "recall keeps its focus when it chooses among far more memories than training showed it: its weights "
            "over N memories are a softmax that sharpens as ln N grows, where the constant scale spreads mass over "
            "every extra distractor. Measured in BENCHMARKS.md."
        },
    )
    recall_sharpen_beyond: int = field(
        default=0,
        metadata={
            "help": "0 (default): off. K > 1: when recall chooses among N > K memories, its scores are multiplied by "
            "ln N / ln K (up to K memories the recall is unchanged). Set K to the most memories training showed recall "
            "(the longest training input's segments): over far more memories at inference the constant-scale softmax "
            "spreads its weight over every extra distractor, and this keeps the focus training gave it. Inference "
            "only when K covers training, so it can be set on an adapter after training (the scalable softmax of "
            "length extrapolation, applied beyond the trained length). N counts the null slot (recall_null). Not with "
            "recall_scale='log_n', which already scales by ln N. Measured in BENCHMARKS.md."
        },
    )
    recall_query: Literal["segment", "previous"] = field(
        default="segment",
        metadata={
            "help": "'segment': the paper's query, from the first tokens of the segment itself (looks ahead under "
            "teacher forcing). 'previous': from the last tokens before the segment (strictly causal)."
        },
    )
    bptt_depth: Optional[int] = field(
        default=None,
        metadata={
            "help": "Truncated BPTT through memory: the memory carried between segments is detached at the start of "
            "every block of K segments, so a loss at segment n reaches at most segments n-K+1..n. None: no truncation."
        },
    )
    use_recall: bool = field(
        default=True,
        metadata={"help": "False is the paper's stage 1: the previous segment's memory is read directly, no recall."},
    )
    loss_scope: Literal["all", "last_segment"] = field(
        default="all",
        metadata={
            "help": "'all': the usual causal-LM loss over every labelled token. 'last_segment': the reference "
            "implementation's protocol: only the last segment_length labels of each row (all of them in a shorter "
            "row), the first of them predicted from the position before them."
        },
    )
    init_std: float = field(
        default=0.02,
        metadata={"help": "Std of the normal init of W_q and W_k. m_0 and s start at the mean input embedding."},
    )
    base_embedding_dim: Optional[int] = field(
        default=None,
        metadata={
            "help": "Input-embedding width of the backbone the adapter was attached to. Filled in when attached and "
            "checked when loading, so an adapter is never loaded onto a backbone of another width."
        },
    )
    lora_r: int = field(
        default=0,
        metadata={"help": "If > 0, also train LoRA of this rank on the backbone, saved in the same adapter (HMT + LoRA)."},
    )
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha (used when lora_r > 0)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout (used when lora_r > 0)."})
    lora_target_modules: Optional[Union[list[str], str]] = field(
        default="all-linear",
        metadata={"help": "Modules that get LoRA when lora_r > 0; PEFT's syntax ('all-linear', names or a regex)."},
    )

    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Filled in when the adapter is attached: the backbone modules it wraps (the input embeddings, "
            "plus LoRA's targets when lora_r > 0). Leave it unset; choose LoRA's targets with lora_target_modules."
        },
    )

    #: Keys of the weights file this config was loaded with (set by `from_pretrained` for a local adapter; not a
    #: field, so never saved). None: unknown (a new adapter, a Hub adapter, a config built by hand).
    saved_weight_keys: ClassVar[Optional[frozenset[str]]] = None

    def __post_init__(self) -> None:
        # HMT adapts causal LMs only; without a task type PEFT would build a plain PeftModel whose forward
        # bypasses the adapter, so the only valid value is also the default.
        if self.task_type is None:
            self.task_type = "CAUSAL_LM"
        super().__post_init__()
        self.peft_type = PeftType.HMT  # registered by hmt_adapter.tuner._peft_shim
        if isinstance(self.lora_target_modules, list):
            self.lora_target_modules = list(self.lora_target_modules)
        self.validate()

    def validate(self) -> None:
        """Reject invalid values and combinations with a `ValueError`/`TypeError` that names the field."""
        for name in ("segment_length", "num_sensory", "recall_window", "recall_dim", "lora_r", "lora_alpha"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"HMTConfig.{name} must be an int, got {type(value).__name__} ({value!r}).")
        if self.segment_length < 1:
            raise ValueError(f"HMTConfig.segment_length must be >= 1, got {self.segment_length}.")
        if self.num_sensory < 0:
            raise ValueError(f"HMTConfig.num_sensory must be >= 0, got {self.num_sensory}.")
        if self.recall_window < 1:
            raise ValueError(f"HMTConfig.recall_window must be >= 1 (memories kept for recall), got {self.recall_window}.")
        if self.recall_dim < 1:
            raise ValueError(f"HMTConfig.recall_dim must be >= 1, got {self.recall_dim}.")
        if isinstance(self.summary_fraction, bool) or not isinstance(self.summary_fraction, (int, float)):
            raise TypeError(f"HMTConfig.summary_fraction must be a float in (0, 1], got {self.summary_fraction!r}.")
        if not 0.0 < float(self.summary_fraction) <= 1.0:
            raise ValueError(f"HMTConfig.summary_fraction must be in (0, 1], got {self.summary_fraction}.")
        if self.write_token not in WRITE_TOKENS:
            raise ValueError(f"HMTConfig.write_token must be one of {WRITE_TOKENS}, got {self.write_token!r}.")
        if self.recall_scale not in RECALL_SCALES:
            raise ValueError(f"HMTConfig.recall_scale must be one of {RECALL_SCALES}, got {self.recall_scale!r}.")
        if isinstance(self.recall_sharpen_beyond, bool) or not isinstance(self.recall_sharpen_beyond, int):
            raise TypeError(f"HMTConfig.recall_sharpen_beyond must be an int (0: off), got {self.recall_sharpen_beyond!r}.")
        if self.recall_sharpen_beyond < 0 or self.recall_sharpen_beyond == 1:
            raise ValueError(f"HMTConfig.recall_sharpen_beyond must be 0 (off) or >= 2 (memories recall was trained "
                             f"over), got {self.recall_sharpen_beyond}.")
        if self.recall_sharpen_beyond and self.recall_scale == "log_n":
            raise ValueError("HMTConfig.recall_sharpen_beyond scales recall by ln N / ln K beyond K memories; "
                             "recall_scale='log_n' already scales by ln N: use one of them.")
        if self.recall_sharpen_beyond and not self.use_recall:
            raise ValueError("HMTConfig.recall_sharpen_beyond scales recall: it needs use_recall=True.")
        if self.recall_query not in RECALL_QUERIES:
            raise ValueError(f"HMTConfig.recall_query must be one of {RECALL_QUERIES}, got {self.recall_query!r}.")
        if self.loss_scope not in LOSS_SCOPES:
            raise ValueError(f"HMTConfig.loss_scope must be one of {LOSS_SCOPES}, got {self.loss_scope!r}.")
        if self.bptt_depth is not None:
            if isinstance(self.bptt_depth, bool) or not isinstance(self.bptt_depth, int):
                raise TypeError(f"HMTConfig.bptt_depth must be an int or None, got {self.bptt_depth!r}.")
            if self.bptt_depth < 1:
                raise ValueError(
                    f"HMTConfig.bptt_depth must be >= 1 (segments a loss reaches back through memory) or None, "
                    f"got {self.bptt_depth}."
                )
        if self.write_token_init_text is not None:
            if not isinstance(self.write_token_init_text, str) or not self.write_token_init_text:
                raise TypeError(f"HMTConfig.write_token_init_text must be a non-empty string or None, got "
                                f"{self.write_token_init_text!r}.")
            if self.write_token_init_text == AUTO_INIT_TEXT:
                raise ValueError("HMTConfig.write_token_init_text='auto' is for `hmt-adapter train` on "
                                 "prompt/completion data, which replaces it with the prompts' last token; in Python, "
                                 "pass that text itself (hmt_adapter_cli.prompt_completion.prompt_end_text finds it).")
            if self.write_token != "learned":
                raise ValueError("HMTConfig.write_token_init_text starts the learned write token: it needs "
                                 f"write_token='learned', got write_token={self.write_token!r}.")
            if not self.tokenizer_name_or_path:
                raise ValueError("HMTConfig.write_token_init_text needs tokenizer_name_or_path (the backbone's "
                                 "tokenizer, a Hub name or a local folder) to turn the text into a token.")
        if not isinstance(self.use_recall, bool):
            raise TypeError(f"HMTConfig.use_recall must be a bool, got {self.use_recall!r}.")
        if not isinstance(self.memory_gate, bool):
            raise TypeError(f"HMTConfig.memory_gate must be a bool, got {self.memory_gate!r}.")
        if self.memory_gate and not self.use_recall:
            raise ValueError("HMTConfig.memory_gate gates the recalled memory: it needs use_recall=True.")
        if not isinstance(self.recall_null, bool):
            raise TypeError(f"HMTConfig.recall_null must be a bool, got {self.recall_null!r}.")
        if self.recall_null and not self.use_recall:
            raise ValueError("HMTConfig.recall_null adds a slot to recall: it needs use_recall=True.")
        if not isinstance(self.memory_projection, bool):
            raise TypeError(f"HMTConfig.memory_projection must be a bool, got {self.memory_projection!r}.")
        if self.lora_r < 0:
            raise ValueError(f"HMTConfig.lora_r must be >= 0 (0 disables LoRA), got {self.lora_r}.")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"HMTConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}.")
        if self.task_type != "CAUSAL_LM":
            raise ValueError(f"HMTConfig.task_type must be 'CAUSAL_LM' (HMT adapts causal LMs), got {self.task_type!r}.")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load the config; for a local adapter directory, also check its weights file before anything is attached.

        A corrupt or truncated ``adapter_model.safetensors`` (or one that does not match ``base_embedding_dim``)
        raises `ValueError` here, before PEFT changes the model. The file's keys are kept on the config
        (``saved_weight_keys``, not saved): attaching it to a backbone whose adapter would have other keys raises
        `ValueError` before anything is attached (`HMTModel._check_new_adapter_config`).
        """
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        directory = str(pretrained_model_name_or_path)
        if subfolder:
            directory = os.path.join(directory, subfolder)
        if os.path.isdir(directory):
            config.saved_weight_keys = check_adapter_weights(directory, getattr(config, "base_embedding_dim", None))
        return config

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Save ``adapter_config.json``; next to saved adapter weights, also the HMT model card (README.md)."""
        super().save_pretrained(save_directory, **kwargs)
        if any(os.path.isfile(os.path.join(save_directory, name)) for name in (SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME)):
            from .model_card import write_model_card

            write_model_card(save_directory, self)

    #: Fields that cannot change how a stream continues (training-only settings and bookkeeping); every other field
    #: HMTConfig declares is recorded in a saved stream state and checked when it is used (`stream_state_fields`).
    STREAM_STATE_EXEMPT: ClassVar[tuple[str, ...]] = (
        "loss_scope", "bptt_depth", "init_std", "lora_dropout", "target_modules", "write_token_init_text",
        "tokenizer_name_or_path",
    )

    @classmethod
    def stream_state_fields(cls) -> tuple[str, ...]:
        """The fields a stream state depends on: every field HMTConfig itself declares (not PEFT's base config's)
        except `STREAM_STATE_EXEMPT`, so a field added later is recorded and checked unless exempted on purpose."""
        own = HMTConfig.__annotations__
        return tuple(f.name for f in fields(cls) if f.name in own and f.name not in cls.STREAM_STATE_EXEMPT)

    @property
    def summary_length(self) -> int:
        """Tokens read by the summary pass: ``ceil(segment_length * summary_fraction)``."""
        return max(1, math.ceil(round(self.segment_length * float(self.summary_fraction), 6)))

    @property
    def positions_per_segment(self) -> int:
        """Positions the backbone sees in a segment pass: memory, sensory, segment, memory."""
        return self.segment_length + self.num_sensory + 2
