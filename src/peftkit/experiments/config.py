"""Typed settings of a method comparison (``peftkit compare``) and a rank sweep (``peftkit sweep``).

Both are one :class:`ExperimentConfig` (data, the training settings of ``peftkit train`` that every entry shares,
the shared evaluation)
plus the list of entries to run: :meth:`CompareConfig.entries` turns ``--methods`` into one entry per
method, :meth:`SweepConfig.entries` one per rank (and target-module set). Every entry is trained on the
same rows with the same steps, batch and seed, and evaluated on the same rows with the same generation
settings; only the method, its options and its learning rate differ.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..evaluate import EvalConfig, GenerationSettings, ScoringSettings
from ..evaluate.forgetting import ForgettingSettings
from ..options import build, coerce, field_types, read_yaml
from ..registry import get_preset, presets
from ..train import TrainConfig

BASELINE = "baseline"
"""The entry name for the frozen base model, evaluated zero-shot (nothing trained)."""


@dataclass
class Entry:
    """One row of a comparison: a method with its options and learning rate.

    Args:
        name: Row label and sub-folder name (``lora``, ``lora-r16``, ``baseline``).
        method: A method preset (``peftkit train --help`` lists them), or ``baseline``.
        options: The method's options that differ from its defaults, by the config's field names (``r``, ...).
        lr: Peak learning rate (``None`` for the baseline, which does not train).
    """

    name: str
    method: str
    options: dict[str, Any] = field(default_factory=dict)
    lr: float | None = None

    @property
    def trains(self) -> bool:
        return self.method != BASELINE


@dataclass
class ExperimentConfig:
    """Settings every entry of a comparison shares: the training settings of ``peftkit train`` (one
    :class:`~peftkit.train.TrainConfig`, less what differs per entry) and the evaluation.

    Args:
        train_data: Training rows (.jsonl/.json/.csv); every trained entry sees the same ones.
        eval_data: Rows to generate and score with ROUGE; every entry is scored on the same ones.
        output: Directory for report.json, report.md, the plots and one sub-folder per entry (runs/NAME).
            Running again with the same output reuses every entry that finished with the same settings.
        method_options: Method options shared by the entries, by peft's field names (``r``, ``target_modules``,
            ...); each method reads the ones it takes, and setting one that no entry takes is an error.
        training: The training settings of ``peftkit train`` that every entry shares (model, format, budget,
            optimizer, precision, seed, ...). ``lr`` None gives each method its own default; per entry: per_method.
        eval_limit: Score only the first N rows of eval_data.
        max_new_tokens: Longest generated prediction, in tokens.
        num_beams: 1 is greedy decoding; more is beam search.
        eval_batch_size: Prompts generated together during evaluation.
        scoring: Metrics every entry is scored with, and how several references per example count.
        latency_rows: Rows (the first ones of eval_data) generated one at a time to time each entry's
            latency per example; adapters that can merge are timed merged and unmerged. 0 skips it.
        example_rows: Rows of eval_data shown in report.md with every entry's prediction.
        forgetting: Catastrophic forgetting: each entry's loss on held-out general text (BBC News articles)
            and its zero-shot accuracy on an untrained task (their topics), against the base model's.
        threads: PyTorch CPU threads per entry (None: PyTorch's default). On a busy machine 1 can be faster.
        isolate: Run each entry in its own Python process: its peak memory is its own, and a crash (out of
            memory, a killed process) fails that entry only. Off: faster start, one process.
    """

    # TrainConfig fields each entry sets itself (data, folder, method) or that a comparison does not use
    # (the held-out loss during training, resuming by hand): not settable in the training section.
    PER_ENTRY: ClassVar[tuple[str, ...]] = ("data", "output", "method", "method_options", "eval_data", "eval_every",
                                            "eval_limit", "resume")

    train_data: str = ""
    eval_data: str = ""
    output: str = ""
    method_options: dict[str, Any] = field(default_factory=dict)
    training: TrainConfig = field(default_factory=TrainConfig)
    eval_limit: int | None = None
    max_new_tokens: int = 128
    num_beams: int = 1
    eval_batch_size: int = 16
    scoring: ScoringSettings = field(default_factory=ScoringSettings)
    latency_rows: int = 8
    example_rows: int = 3
    forgetting: ForgettingSettings = field(default_factory=ForgettingSettings)
    threads: int | None = None
    isolate: bool = True

    def __post_init__(self) -> None:
        for name in ("latency_rows", "example_rows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"threads must be an integer >= 1, got {self.threads!r}.")
        if self.training.task != "generate":  # its latency, forgetting, report and plots are built on generated text
            raise ValueError(f"task {self.training.task!r}: peftkit compare and sweep compare generation (ROUGE, latency, "
                             "forgetting); train and score each classifier with `peftkit train --task classify` and "
                             "`peftkit eval --task classify` instead.")
        blank = TrainConfig()
        for name in self.PER_ENTRY:
            if getattr(self.training, name) != getattr(blank, name):
                raise ValueError(f"training.{name} cannot be set in a comparison: each entry sets its own "
                                 "(--train-data, --eval-data and --output are the comparison's; methods in --methods).")
        if "rouge" not in self.scoring.metrics:
            raise ValueError(f"--metrics {','.join(self.scoring.metrics)}: a comparison always scores ROUGE (its table, "
                             f"conclusion and plots use it); add others beside it, e.g. --metrics rouge,{self.scoring.metrics[0]}.")
        # The evaluation settings validate themselves (one place for each rule); training's already did.
        self.eval_config("check")

    @property
    def model(self) -> str:
        return self.training.model

    def check_required(self) -> None:
        needed = [("--eval-data", self.eval_data), ("--output", self.output)]
        if any(e.trains for e in self.entries()):
            needed.insert(0, ("--train-data", self.train_data))
        missing = [flag for flag, value in needed if not value]
        if missing:
            raise ValueError(f"Missing {', '.join(missing)}: a comparison trains on --train-data, scores every entry "
                             "on --eval-data and writes to --output.")

    def entries(self) -> list[Entry]:
        raise NotImplementedError

    # --- what each entry runs: the existing training and evaluation configs ---------------------------
    def train_config(self, entry: Entry, output: str) -> TrainConfig:
        """The shared training settings plus what this entry sets: data, folder, method, options, learning rate."""
        return dataclasses.replace(self.training, data=self.train_data, output=output, method=entry.method,
                                   method_options=entry.options, lr=entry.lr)

    def generation(self) -> GenerationSettings:
        return GenerationSettings(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams,
                                  batch_size=self.eval_batch_size, precision=self.training.precision)

    def eval_config(self, output: str, model: str | None = None, adapter: str | None = None) -> EvalConfig:
        return EvalConfig(model=model or self.model, adapter=adapter, data=self.eval_data, output=output,
                          limit=self.eval_limit, format=self.training.format, generation=self.generation(),
                          scoring=dataclasses.replace(self.scoring), cpu=self.training.cpu)

    def _entry(self, name: str, method: str, options: dict[str, Any] | None = None, lr: float | None = None) -> Entry:
        """An entry for ``method``: the shared options it takes, and ``lr`` or the shared or method's default."""
        if method == BASELINE:
            return Entry(name, BASELINE)
        preset = get_preset(method)
        shared = options if options is not None else self.method_options
        takes = {*preset.options(), *preset.legacy}
        own = preset.read({k: v for k, v in shared.items() if k in takes})
        shared_lr = self.training.lr
        return Entry(name, method, own, lr if lr is not None else shared_lr if shared_lr is not None else preset.default_lr)

    def _check_options_used(self, entries: list[Entry]) -> None:
        used = set()
        for entry in entries:
            if entry.trains:
                preset = get_preset(entry.method)
                used |= {*preset.options(), *preset.legacy}
        unused = sorted(set(self.method_options) - used)
        if unused:
            raise ValueError(f"Option(s) {', '.join(unused)} are used by none of the entries "
                             f"({', '.join(e.name for e in entries)}); remove them or add a method that uses them.")


@dataclass
class CompareConfig(ExperimentConfig):
    """Compare methods on one task: ``peftkit compare``.

    Args:
        methods: Entries to compare, in the report's order: ``baseline`` (the frozen model, zero-shot) and
            any method preset (full, lora, dora, ia3, bottleneck, prompt_tuning, prefix_tuning, p_tuning,
            bitfit, norm, last_layers, selective). NAME=METHOD adds a method under another name, to compare
            two settings of one method: lora,lora_all=lora with per_method lora_all.target_modules=all-linear.
        per_method: Settings for one entry only, as NAME.KEY=VALUE: the learning rate (lora.lr=5e-4) or any
            method option (lora.r=16, prompt_tuning.num_virtual_tokens=32). In YAML also a mapping
            (per_method: {lora: {r: 16}}).
    """

    methods: list[str] = field(default_factory=lambda: [BASELINE, "full", "lora"])
    per_method: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.entries()  # unknown methods, duplicates and misplaced options fail here, before anything runs

    def entries(self) -> list[Entry]:
        known = presets()
        if not self.methods:
            raise ValueError("--methods is empty; list at least one, e.g. baseline,full,lora.")
        named = [self._name_and_method(item) for item in self.methods]
        for _, method in named:
            if method != BASELINE and method not in known:
                raise ValueError(f"Unknown method {method!r} in --methods; choose from {BASELINE}, {', '.join(known)}.")
        names = [name for name, _ in named]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"--methods lists {', '.join(duplicates)} more than once; name a second one NAME=METHOD.")
        overrides = self._overrides(names)
        entries = []
        for name, method in named:
            entry = self._entry(name, method)
            for key, text in overrides.get(name, {}).items():
                if not entry.trains:
                    raise ValueError(f"per_method {name}.{key}: the baseline trains nothing and takes no settings.")
                if key == "lr":
                    entry.lr = coerce(text, float, f"{name}.lr")
                    if not entry.lr > 0:
                        raise ValueError(f"per_method {name}.lr must be > 0, got {entry.lr!r}.")
                    continue
                preset = get_preset(method)
                if key not in {*preset.options(), *preset.legacy}:
                    raise ValueError(f"per_method {name}.{key}: {method} does not take {key!r}; it takes "
                                     f"{', '.join(['lr', *preset.options()])}.")
                entry.options = preset.read({**entry.options, key: text})
            entries.append(entry)
        self._check_options_used(entries)
        return entries

    @staticmethod
    def _name_and_method(item: str) -> tuple[str, str]:
        name, sep, method = item.partition("=")
        name, method = name.strip(), method.strip()
        if not sep:
            return name, name
        if not re.fullmatch(r"[\w.+-]+", name) or not method:
            raise ValueError(f"--methods {item!r}: write NAME=METHOD with a NAME of letters, digits, '_', '-', '.' or '+'.")
        return name, method

    def _overrides(self, names: list[str]) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        items: list[str] = []
        for piece in self.per_method or []:  # "lora.target_modules=q_proj,v_proj" arrives cut at the comma
            if "=" not in piece and items:
                items[-1] += "," + piece
            else:
                items.append(piece)
        for item in items:
            match = re.fullmatch(r"\s*([\w.+-]+)\.(\w+)\s*=(.*)", item)
            if match is None:
                raise ValueError(f"per_method {item!r}: write NAME.KEY=VALUE, e.g. lora.r=16 or full.lr=2e-5.")
            name, key, value = match.groups()
            if name not in names:
                raise ValueError(f"per_method {item!r}: {name!r} is not in --methods ({', '.join(names)}).")
            out.setdefault(name, {})[key] = value.strip()
        return out


@dataclass
class SweepConfig(ExperimentConfig):
    """A rank sweep: ``peftkit sweep`` trains one adapter per rank (and per target-module set).

    Args:
        method: The method swept; any method with a rank (lora, dora).
        ranks: Ranks r to train, e.g. 4,8,16,32,64. lora_alpha is 2 x r at every rank unless --lora-alpha is
            given, so the update's scale lora_alpha/r is the same at every rank (a sweep of capacity, not of scale).
        target_module_sets: Several sets of modules to adapt, each swept over every rank: sets separated by
            commas, modules within a set by '+', e.g. q_proj+v_proj,all-linear (None: the method's default).
        baseline: Also evaluate the frozen base model zero-shot, the reference for every gain.
        auto: Choose the rank for you: report the cheapest entry (fewest trainable parameters, so the
            smallest rank) whose ROUGE-L is within --tolerance of the best, and what it saves against the best.
        tolerance: How far below the best ROUGE-L (in points, x 100) the chosen rank may score. Differences
            of about a point are noise on a few dozen evaluation rows: set it to what your evaluation can tell apart.
    """

    method: str = "lora"
    ranks: list[int] = field(default_factory=lambda: [4, 8, 16, 32, 64])
    target_module_sets: list[str] | None = None
    baseline: bool = True
    auto: bool = False
    tolerance: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.tolerance, bool) or not isinstance(self.tolerance, (int, float)) or not self.tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0 ROUGE-L points, got {self.tolerance!r}.")
        self.entries()

    def entries(self) -> list[Entry]:
        preset = get_preset(self.method)
        if "r" not in preset.options():
            raise ValueError(f"{self.method} has no rank to sweep; use a method with one (lora, dora).")
        if not self.ranks or any(r < 1 for r in self.ranks) or len(set(self.ranks)) != len(self.ranks):
            raise ValueError(f"ranks must be distinct integers >= 1, got {self.ranks!r}.")
        shared = preset.read(self.method_options)  # old names (alpha, dropout) read as the new ones
        if "r" in shared:
            raise ValueError("A sweep sets r from --ranks; remove the single r (or rank) setting.")
        if self.target_module_sets and "target_modules" in shared:
            raise ValueError("Give either --target-modules (one set) or --target-module-sets (several), not both.")
        sets: list[list[str] | str | None] = [None]
        if self.target_module_sets:
            sets = [s if s == "all-linear" else s.split("+") for s in self.target_module_sets]
        entries = [self._entry(BASELINE, BASELINE)] if self.baseline else []
        for modules in sets:
            for rank in sorted(self.ranks):
                options = {"lora_alpha": 2 * rank, **shared, "r": rank}
                if modules is not None:
                    options["target_modules"] = modules
                suffix = "" if modules is None else "-" + (modules if isinstance(modules, str) else "+".join(modules))
                entries.append(self._entry(f"{self.method}-r{rank}{suffix}", self.method, options))
        self._check_options_used(entries)
        return entries


def build_experiment_config(cls: type, yaml_path: str | None = None, sets: list[str] | None = None, **flags: Any):
    """Defaults, then the YAML file, then ``--set`` pairs, then flags; ``per_method`` may be a mapping in YAML."""
    values = read_yaml(yaml_path) if yaml_path else {}
    if isinstance(values.get("per_method"), dict):
        values["per_method"] = [f"{method}.{key}={_yaml_text(value)}" for method, settings in values["per_method"].items()
                                for key, value in (settings or {}).items()]
    return build(cls, sets=sets, file_values=values, **flags)


def _yaml_text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a (nested) config dataclass from ``dataclasses.asdict`` output (a run's spec.json)."""
    kwargs = {}
    types = field_types(cls)
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        value = data[f.name]
        inner = types[f.name]
        kwargs[f.name] = from_dict(inner, value) if dataclasses.is_dataclass(inner) and isinstance(value, dict) else value
    return cls(**kwargs)
