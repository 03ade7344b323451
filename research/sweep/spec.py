"""The sweep file: schema, search space, derived fields, and the trials it describes.

A sweep file names a base experiment, fixed overrides, a search space (grid values, random
distributions, or optuna TPE), derived fields computed from the swept ones, an objective, a trial
budget and how many trials run at once. Grid and random sweeps fix their whole trial list here,
from the file alone (random: a seeded RNG), so every worker on every machine sees the same list.
Everything is checked before any trial runs, including each trial's resolved experiment config.
"""

from __future__ import annotations

import ast
import hashlib
import itertools
import json
import math
import operator
import random
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr
from pydantic import field_validator, model_validator

from research import config as config_lib
from research.config import ConfigError
from research.sweep import swarm

Scalar = Union[StrictBool, StrictInt, StrictFloat, StrictStr, None]
SEED_KEY = "train.seed"  # what `seeds:` varies between the replicates of a point


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ----------------------------------------------------------------------------- schema

_DIMENSION_FORMS = ("a list of values, or one of {uniform: [low, high]}, {log_uniform: [low, high]}, "
                    "{int: [low, high]}, {choice: [a, b, ...]}")


class Dimension(_Strict):
    """One swept field: a list of values (grid points / random choice) or a distribution."""

    kind: Literal["values", "uniform", "log_uniform", "int"]
    values: tuple[Scalar, ...] = ()
    low: float | None = None
    high: float | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, raw: Any) -> Any:
        if isinstance(raw, list):
            return {"kind": "values", "values": raw}
        if isinstance(raw, dict) and len(raw) == 1:
            (kind, arg), = raw.items()
            if kind == "choice":
                if not isinstance(arg, list):
                    raise ValueError(f"choice takes a list of values, got {arg!r}")
                return {"kind": "values", "values": arg}
            if kind in ("uniform", "log_uniform", "int"):
                if not (isinstance(arg, list) and len(arg) == 2):
                    raise ValueError(f"{kind} takes [low, high], got {arg!r}")
                return {"kind": kind, "low": arg[0], "high": arg[1]}
        if isinstance(raw, dict) and "kind" in raw:
            return raw  # already in long form (e.g. re-validating a dumped spec)
        raise ValueError(f"expected {_DIMENSION_FORMS}; got {raw!r}")

    @model_validator(mode="after")
    def _bounds(self) -> Dimension:
        if self.kind == "values":
            if not self.values:
                raise ValueError("empty list: give at least one value")
            return self
        assert self.low is not None and self.high is not None
        if not self.low < self.high:
            raise ValueError(f"{self.kind}: low {self.low:g} must be below high {self.high:g}")
        if self.kind == "log_uniform" and self.low <= 0:
            raise ValueError(f"log_uniform: low must be positive, got {self.low:g}")
        if self.kind == "int" and not (self.low.is_integer() and self.high.is_integer()):
            raise ValueError(f"int: low and high must be integers, got [{self.low:g}, {self.high:g}]")
        return self

    def sample(self, rng: random.Random) -> Any:
        """One random draw (random search, and the up-front check of a TPE space)."""
        if self.kind == "values":
            return rng.choice(self.values)
        assert self.low is not None and self.high is not None
        if self.kind == "int":
            return rng.randint(int(self.low), int(self.high))
        if self.kind == "log_uniform":
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.uniform(self.low, self.high)


class Search(_Strict):
    """What is swept and how points are chosen. `isoflop`: the grid of `params` at each compute
    budget, `train.steps` set so that steps x tokens/step x FLOPs/token is the budget.
    `mixture`: `trials` mixtures of the base experiment's data sources (research/sweep/swarm.py)
    at every point of the grid of `params` (which may be empty). `cooldowns`: the long run in
    `from` (trained first if it is not there), then one cooldown branch of it per entry of
    `steps` (docs/training.md)."""

    method: Literal["grid", "random", "tpe", "isoflop", "mixture", "cooldowns"] = "grid"
    params: dict[str, Dimension] = Field({}, description="dotted config field -> values")
    startup_trials: int = Field(5, ge=1, description="tpe: random trials before the model kicks in")
    budgets: tuple[Annotated[float, Field(gt=0)], ...] = Field(
        (), description="isoflop: training compute budgets in FLOPs")
    sources: tuple[str, ...] = Field((), description="mixture: names from the base experiment's "
                                     "data.sources whose weights are drawn")
    trials: int | None = Field(None, gt=0, description="mixture: how many mixtures, the natural "
                               "and the uniform one included")
    concentration: float = Field(1.0, gt=0, description="mixture: Dirichlet concentration; larger "
                                 "keeps draws nearer the natural mix")
    max_repetition: float | None = Field(None, gt=0, description="mixture: no source is read more "
                                         "than this many times over at train.steps")
    from_: str | None = Field(None, alias="from", description="cooldowns: the long run's "
                              "directory (relative to the current one); its config is the "
                              "sweep's base + overrides")
    steps: tuple[Annotated[int, Field(gt=0)], ...] = Field(
        (), description="cooldowns: the long run's checkpoint steps to branch from")
    cooldown_fraction: float | None = Field(None, gt=0, lt=1, description="cooldowns: each "
                                            "branch's share of steps spent decaying")

    @model_validator(mode="after")
    def _method_fields(self) -> Search:
        cooldown = [k for k in ("from_", "steps", "cooldown_fraction") if getattr(self, k)]
        if self.method == "cooldowns":
            if self.params:
                raise ValueError("params: a cooldowns search sweeps no fields (its trials are the "
                                 "long run and one branch per step)")
            if len(cooldown) < 3:
                missing = sorted({"from_", "steps", "cooldown_fraction"} - set(cooldown))[0]
                raise ValueError(f"{missing.rstrip('_')}: a cooldowns search needs from (the long "
                                 "run), steps and cooldown_fraction")
        elif cooldown:
            raise ValueError(f"{cooldown[0].rstrip('_')}: only a cooldowns search takes it")
        if self.method != "mixture":
            if not self.params and self.method != "cooldowns":
                raise ValueError(f"params: a {self.method} search needs at least one swept field")
            given = [k for k in ("sources", "trials", "max_repetition") if getattr(self, k)]
            if given or self.concentration != 1.0:
                raise ValueError(f"{(given or ['concentration'])[0]}: only a mixture search takes it")
            return self
        if len(self.sources) < 2 or len(set(self.sources)) != len(self.sources):
            raise ValueError(f"sources: a mixture search needs two or more distinct source names, "
                             f"got {list(self.sources)}")
        least = swarm.min_trials(len(self.sources))
        if self.trials is None or self.trials < least:
            raise ValueError(
                f"trials: the mixture laws over {len(self.sources)} sources have "
                f"{swarm.law_parameters(len(self.sources))} parameters and are cross-validated "
                f"leaving 1/{swarm.CV_FOLDS} out: they need at least {least} mixtures, got "
                f"{self.trials}")
        return self


class Objective(_Strict):
    """The number a trial is judged by, read from its metrics.jsonl."""

    metric: str = Field("eval_loss", min_length=1, description="a key of metrics.jsonl entries")
    direction: Literal["minimize", "maximize"] = "minimize"
    reduce: Literal["final", "best"] = Field("final", description="last value, or best over evals")


class MedianPruner(_Strict):
    """Stop a trial whose metric is worse than the median of earlier trials at the same step."""

    type: Literal["median"]
    startup_trials: int = Field(2, ge=0, description="finished trials before anything is pruned")
    warmup_steps: int = Field(0, ge=0, description="no pruning before this training step")


class HalvingPruner(_Strict):
    """Successive halving: keep the best 1/reduction_factor of trials at each rung."""

    type: Literal["successive_halving"]
    min_steps: int = Field(1, gt=0, description="training steps before the first rung")
    reduction_factor: int = Field(3, ge=2)


class SweepSpec(_Strict):
    """One sweep file."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: str = Field(description="experiment YAML, relative to the sweep file or the cwd")
    overrides: dict[str, Union[Scalar, list[Any]]] = Field(
        {}, description="fixed for every trial: dotted key -> value (a list too, e.g. data.stages: [])")
    search: Search
    derived: dict[str, str] = Field({}, description="dotted key -> expression over swept names")
    objective: Objective = Objective()
    trials: int | None = Field(None, gt=0, description="budget; grid: all points when unset")
    parallel: int = Field(1, gt=0, description="trials run at once by one worker")
    seeds: int = Field(1, gt=0, description="replicates of every point, with train.seed = 0..seeds-1 "
                       "(initialisation and data order); analysis compares points against this noise")
    seed: int = 0
    storage: str | None = Field(None, description="database URL; default: SQLite in the sweep dir")
    pruner: MedianPruner | HalvingPruner | None = Field(None, discriminator="type")
    lease_s: float = Field(60.0, ge=5, description="a claim with no heartbeat for this long is "
                           "taken over by another worker")

    @field_validator("overrides", mode="before")
    @classmethod
    def _override_values(cls, overrides: Any) -> Any:
        """Name the key whose value is not a config value (pydantic would name a union member)."""
        for key, value in (overrides.items() if isinstance(overrides, dict) else ()):
            if not isinstance(value, (bool, int, float, str, list, type(None))):
                raise ValueError(f"overrides.{key}: a number, string, boolean, null or list, not "
                                 f"{type(value).__name__} {value!r} (dotted keys set one field each, "
                                 f"e.g. {key}.FIELD: ...)")
        return overrides

    @model_validator(mode="after")
    def _consistent(self) -> SweepSpec:
        params, method = self.search.params, self.search.method
        if method in ("grid", "isoflop", "mixture"):
            for key, dim in params.items():
                if dim.kind != "values":
                    raise ValueError(f"search.params.{key}: {method} search needs a list of values, "
                                     f"not a {dim.kind} distribution (use method: random or tpe)")
        if (method == "isoflop") != bool(self.search.budgets):
            raise ValueError("search.budgets: an isoflop search needs compute budgets (FLOPs), "
                             "and only an isoflop search takes them")
        if method == "isoflop" and STEPS in {*params, *self.derived, *self.overrides}:
            raise ValueError(f"{STEPS}: an isoflop search sets it from each budget; do not sweep, "
                             "derive or override it")
        if method == "cooldowns" and (self.seeds > 1 or self.parallel > 1):
            raise ValueError("seeds/parallel: a cooldowns search runs its long run, then its "
                             "branches, one at a time (each branch starts from the long run's "
                             "checkpoint); make one sweep per seed")
        if method not in ("grid", "isoflop", "mixture", "cooldowns") and self.trials is None:
            raise ValueError(f"trials: a {self.search.method} search needs a trial budget")
        if method == "mixture" and self.trials is not None:
            raise ValueError("trials: a mixture search takes its number of mixtures as "
                             "search.trials (and runs each at every grid point)")
        weights = [swarm.weight_key(name) for name in self.search.sources]
        short: dict[str, str] = {name: "a name of the expression language" for name in MODEL_NAMES}
        for key in [*params, *weights, *self.derived]:
            name = short_name(key)
            if name in short:
                raise ValueError(f"{key} and {short[name]} share the short name {name!r} used in "
                                 "trial names and derived expressions")
            short[name] = key
        for key in self.derived:
            if key in params or key in weights:
                raise ValueError(f"derived.{key}: already swept in search")
        for key in self.overrides:
            if key in params or key in weights or key in self.derived:
                raise ValueError(f"overrides.{key}: also swept or derived; set it in one place")
        if self.seeds > 1:
            if self.search.method == "tpe":
                raise ValueError("seeds: replicates need a fixed trial list (method: grid, isoflop "
                                 "or random), not tpe")
            if SEED_KEY in {*params, *self.derived, *self.overrides}:
                raise ValueError(f"seeds: {self.seeds} sets {SEED_KEY} for every trial; do not also "
                                 "sweep, derive or override it")
        known = {short_name(k) for k in [*params, *weights]} | set(MODEL_NAMES)
        for key, expr in self.derived.items():
            check_expression(expr, known, f"derived.{key}")
            known.add(short_name(key))
        return self


# ----------------------------------------------------------------------------- derived fields

STEPS = "train.steps"
# Names every derived expression may use besides the swept ones: the trial's model as
# `research train` counts it (research/train/flops.py), and an isoflop trial's budget (else 0).
MODEL_NAMES = ("params", "params_active", "flops_per_token", "tokens_per_step", "budget")
BUDGET_TOLERANCE = 0.01  # an isoflop trial's FLOPs may miss its budget by this fraction


def model_numbers(cfg: config_lib.ExperimentConfig) -> dict[str, float]:
    """params (total), params_active, flops_per_token (the MFU formula) and tokens_per_step."""
    from research.data.tokenizer import load_tokenizer
    from research.models.decoder import padded_vocab
    from research.train import flops

    vocab = padded_vocab(cfg.model, load_tokenizer(cfg.data.tokenizer).vocab_size)
    counts = flops.param_counts(cfg.model, vocab)
    return {"params": counts["total"], "params_active": counts["active"],
            "flops_per_token": flops.flops_per_token(cfg.model, vocab, cfg.train.seq_len),
            "tokens_per_step": cfg.train.batch_size * cfg.train.seq_len}


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_FUNCTIONS = {"min": min, "max": max, "round": round, "int": int, "float": float, "abs": abs}
_ALLOWED = ("numbers, swept names, + - * / // % **, parentheses and "
            + "/".join(_FUNCTIONS) + "(...)")


def _parse(expr: str, where: str) -> ast.expr:
    try:
        return ast.parse(expr.strip(), mode="eval").body
    except SyntaxError as exc:
        raise ValueError(f"{where}: cannot parse {expr!r} ({exc.msg})") from None


def _evaluate(node: ast.expr, names: dict[str, Any], where: str) -> Any:
    """Walk a whitelisted arithmetic AST; anything else (attributes, subscripts, ...) is refused."""
    ev = lambda n: _evaluate(n, names, where)  # noqa: E731
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise ValueError(f"{where}: unknown name {node.id!r} (known: {', '.join(sorted(names))})")
        return names[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = ev(node.left), ev(node.right)
        if isinstance(node.op, ast.Pow) and isinstance(right, (int, float)) and abs(right) > 64:
            raise ValueError(f"{where}: exponent {right} too large")
        return _BINARY[type(node.op)](left, right)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](ev(node.operand))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
            and node.func.id in _FUNCTIONS and not node.keywords):
        return _FUNCTIONS[node.func.id](*(ev(arg) for arg in node.args))
    raise ValueError(f"{where}: {ast.unparse(node)!r} is not allowed; use {_ALLOWED}")


def check_expression(expr: str, known: set[str], where: str) -> None:
    """Refuse a derived expression that uses unknown names or anything beyond arithmetic."""
    try:
        _evaluate(_parse(expr, where), {name: 1 for name in known}, where)
    except (ArithmeticError, TypeError):
        pass  # a value problem, not a shape problem: each trial's own values are checked later


def evaluate(expr: str, names: dict[str, Any], where: str) -> Any:
    """The value of a derived expression for one trial's swept values."""
    try:
        return _evaluate(_parse(expr, where), names, where)
    except (ArithmeticError, TypeError) as exc:
        raise ConfigError(f"{where}: {expr!r} fails for "
                          f"{', '.join(f'{k}={v}' for k, v in names.items())} ({exc})") from None


# ----------------------------------------------------------------------------- trials


def short_name(key: str) -> str:
    """`model.n_layers` -> `n_layers`, `data.sources.code.weight` -> `code`: the name used in
    trial names and expressions."""
    return swarm.source_of(key) or key.rsplit(".", 1)[-1]


def render(key: str, value: Any) -> str:
    """`key=value` that `research.config.parse_value` reads back as exactly `value`."""
    if isinstance(value, float):
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:
            text = f"{mantissa}.0e{exponent}"  # YAML 1.1 reads 1e-05 as a string, 1.0e-05 as a float
    elif isinstance(value, str) and config_lib.parse_value(value) == value:
        text = value
    else:
        text = json.dumps(value)
    return f"{key}={text}"


def _short_value(value: Any) -> str:
    text = f"{value:.3g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9.+-]", "_", text)


def trial_name(number: int, params: dict[str, Any], budget: float | None = None,
               seed: int | None = None) -> str:
    """A readable, unique run-directory name, e.g. `t003-n_layers=8-lr=0.001`, `t004-C=1e+14-...`
    (`-seed=1` for a replicate)."""
    parts = [f"t{number:03d}", *([f"C={budget:.3g}"] if budget is not None else []),
             *(f"{short_name(k)}={_short_value(v)}" for k, v in params.items())]
    name = "-".join(parts)[:112]
    return name if seed is None else f"{name}-seed={seed}"


@dataclass(frozen=True)
class Trial:
    """One point of the sweep, with everything needed to launch it."""

    number: int
    name: str
    params: dict[str, Any]
    derived: dict[str, Any]
    overrides: tuple[str, ...]
    budget: float | None = None  # isoflop: the training FLOPs its steps were chosen for
    seed: int | None = None  # train.seed of a replicate (sweeps with `seeds:`)
    run_dir: str | None = None  # where it runs, if not in the sweep dir (a cooldowns' long run)

    def record(self) -> dict[str, Any]:
        budget = {} if self.budget is None else {"budget": self.budget}
        run_dir = {} if self.run_dir is None else {"run_dir": self.run_dir}
        return {"number": self.number, "name": self.name, "params": self.params,
                "derived": self.derived, "seed": self.seed, "overrides": list(self.overrides),
                **budget, **run_dir}


@dataclass(frozen=True)
class Sweep:
    """A validated sweep file plus where it lives and the overrides given on the command line."""

    spec: SweepSpec
    path: Path
    base: Path
    cli_overrides: tuple[str, ...] = ()

    @property
    def fixed_overrides(self) -> list[str]:
        return [*(render(k, v) for k, v in self.spec.overrides.items()), *self.cli_overrides]

    def _numbers(self, values: dict[str, Any], where: str) -> dict[str, float]:
        """MODEL_NAMES' values for a trial's swept and derived values so far."""
        try:
            cfg = config_lib.load(self.base, [*self.fixed_overrides,
                                              *(render(k, v) for k, v in values.items())])
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        return model_numbers(cfg)

    def make_trial(self, number: int, params: dict[str, Any], budget: float | None = None,
                   seed: int | None = None) -> Trial:
        name = trial_name(number, params, budget, seed)
        names: dict[str, Any] = {short_name(k): v for k, v in params.items()}
        names["budget"] = budget or 0
        derived: dict[str, Any] = {}
        for key, expr in self.spec.derived.items():
            where = f"{self.path}: derived.{key}"
            if set(MODEL_NAMES[:-1]) & {n.id for n in ast.walk(_parse(expr, where))
                                        if isinstance(n, ast.Name)}:
                names.update(self._numbers({**params, **derived}, f"{self.path}: trial {name}"))
            derived[key] = evaluate(expr, names, where)
            names[short_name(key)] = derived[key]
        if budget is not None:
            derived[STEPS] = self._steps(budget, self._numbers({**params, **derived},
                                                               f"{self.path}: trial {name}"), name)
        swept = [render(k, v) for k, v in {**params, **derived}.items()]
        replicate = [] if seed is None else [render(SEED_KEY, seed)]
        return Trial(number, name, dict(params), derived,
                     (*self.fixed_overrides, *swept, *replicate), budget, seed)

    def _steps(self, budget: float, numbers: dict[str, float], name: str) -> int:
        """round(budget / FLOPs per step); refused when that misses the budget by over 1%."""
        per_step = numbers["flops_per_token"] * numbers["tokens_per_step"]
        steps = round(budget / per_step)
        miss = abs(steps * per_step - budget) / budget
        if miss > BUDGET_TOLERANCE:
            raise ConfigError(
                f"{self.path}: trial {name}: budget {budget:.3g} FLOPs is {budget / per_step:.3g} "
                f"steps of {per_step:.3g} FLOPs; {steps} steps miss it by {miss:.1%} (over "
                f"{BUDGET_TOLERANCE:.0%}): raise the budget or make the model or batch smaller")
        return steps

    @property
    def swept(self) -> list[str]:
        """Every key a trial sets from the search: the params, then a mixture's source weights."""
        return [*self.spec.search.params,
                *(swarm.weight_key(name) for name in self.spec.search.sources)]

    def _grid(self) -> list[dict[str, Any]]:
        params = self.spec.search.params
        return [dict(zip(params, values))
                for values in itertools.product(*(d.values for d in params.values()))]

    @cached_property
    def mixture_plan(self) -> dict[str, Any]:
        """A mixture search's source token counts, natural mix, caps (at the largest run of the
        grid) and its mixtures, each {source: weight}; checked against the base experiment."""
        search = self.spec.search
        where = f"{self.path}: search"
        try:
            tokens = swarm.source_tokens(config_lib.load(self.base, self.fixed_overrides))
        except ConfigError as exc:
            raise ConfigError(f"{self.path}: {exc}") from None
        unknown = [name for name in search.sources if name not in tokens]
        if unknown:
            raise ConfigError(f"{where}.sources: {unknown[0]!r} is not a training source of the "
                              f"base experiment (its data.sources: {', '.join(tokens)})")
        if set(tokens) - set(search.sources):
            raise ConfigError(f"{where}.sources: list every training source of the base "
                              f"experiment ({', '.join(tokens)}); one left out would keep its "
                              "weight beside the drawn ones")
        tokens = {name: tokens[name] for name in search.sources}
        p = swarm.natural(tokens)
        natural = {swarm.weight_key(name): float(w) for name, w in zip(tokens, p)}
        train = max(self._train_tokens({**grid, **natural}) for grid in self._grid())
        upper = swarm.caps(tokens, train, search.max_repetition)
        try:
            mixes = swarm.draw(tokens, search.trials, search.concentration, upper, self.spec.seed)
        except ValueError as exc:
            raise ConfigError(
                f"{where}.max_repetition: {search.max_repetition:g}: the sources hold "
                f"{sum(tokens.values())} training tokens and a run trains on {train}: {exc}"
            ) from None
        return {"sources": list(tokens), "tokens": tokens,
                "natural": dict(zip(tokens, p.tolist())),
                "caps": dict(zip(tokens, upper.tolist())), "train_tokens": train,
                "mixtures": mixes}

    def _train_tokens(self, point: dict[str, Any]) -> int:
        cfg = self.trial_config(self.make_trial(0, point).overrides)
        return cfg.train.steps * cfg.train.batch_size * cfg.train.seq_len

    def planned_trials(self) -> list[Trial]:
        """The fixed trial list of a grid, isoflop (the grid at each budget, budgets outermost),
        random, mixture (each mixture at each grid point, the grid outermost) or cooldowns sweep
        (the long run, then its branches); TPE trials are asked one at a time."""
        params, method = self.spec.search.params, self.spec.search.method
        if method in ("grid", "isoflop"):
            grid = self._grid()
            budgets: list[float | None] = [*self.spec.search.budgets] or [None]
            points = [(c, p) for c in budgets for p in grid][: self.spec.trials]
        elif method == "mixture":
            mixes = [{swarm.weight_key(k): w for k, w in mix.items()}
                     for mix in self.mixture_plan["mixtures"]]
            points = [(None, {**g, **m}) for g in self._grid() for m in mixes]
        elif method == "cooldowns":
            return self._cooldown_trials()
        elif method == "random":
            rng = random.Random(self.spec.seed)
            points = [(None, {k: d.sample(rng) for k, d in params.items()})
                      for _ in range(self.spec.trials)]
        else:
            return []
        seeds = self.spec.seeds
        if seeds == 1:
            return [self.make_trial(n, p, c) for n, (c, p) in enumerate(points)]
        return [self.make_trial(n * seeds + s, p, c, s) for n, (c, p) in enumerate(points)
                for s in range(seeds)]

    def _cooldown_trials(self) -> list[Trial]:
        """The long run (resumed, or a no-op, when it is there), then a branch per step."""
        from research.train import branch

        search = self.spec.search
        long_run = Path(search.from_).absolute()  # type: ignore[arg-type]
        parent = config_lib.load(self.base, self.fixed_overrides)
        trials = [Trial(0, "t000-long", {}, {}, tuple(self.fixed_overrides),
                        run_dir=str(long_run))]
        keep_every = parent.checkpoint.keep_every
        for number, step in enumerate(search.steps, 1):
            where = f"{self.path}: search.steps: {step}"
            if not keep_every or step % keep_every:
                raise ConfigError(f"{where} is not a checkpoint the long run keeps "
                                  f"(checkpoint.keep_every={keep_every}); set checkpoint.every "
                                  "and checkpoint.keep_every in overrides to divide every step")
            overrides = branch.overrides(parent, long_run, step,
                                         cooldown_fraction=search.cooldown_fraction, what=where)
            end = branch.cooldown_length(step, search.cooldown_fraction) + step  # type: ignore[arg-type]
            trials.append(Trial(number, f"t{number:03d}-branch={step}", {"branch.step": step},
                                {STEPS: end}, (*self.fixed_overrides, *overrides)))
        return trials

    @property
    def budget(self) -> int:
        return self.spec.trials if self.spec.search.method == "tpe" else len(self.planned_trials())

    def trial_config(self, overrides: list[str] | tuple[str, ...]) -> config_lib.ExperimentConfig:
        return config_lib.load(self.base, list(overrides))

    def check(self, tpe_samples: int = 16) -> None:
        """Resolve every planned trial's experiment config (TPE: a seeded sample) before any runs."""
        try:
            config_lib.load(self.base, self.fixed_overrides)
        except ConfigError as exc:
            raise ConfigError(f"{self.path}: overrides: {exc}") from None
        trials = self.planned_trials()
        if self.spec.search.method == "tpe":
            rng = random.Random(self.spec.seed)
            params = self.spec.search.params
            trials = [self.make_trial(n, {k: d.sample(rng) for k, d in params.items()})
                      for n in range(tpe_samples)]
        for trial in trials:
            try:
                config_lib.load(self.base, trial.overrides)
            except ConfigError as exc:
                raise ConfigError(f"{self.path}: trial {trial.name}: {exc}") from None

    def settings(self) -> dict[str, Any]:
        """What the fingerprint covers, flat and readable: the sweep file's fields (`sweep: ...`)
        and every trial's experiment before the swept values (base + fixed overrides), so a
        refused rerun can name what differs."""
        spec = self.spec.model_dump(mode="json", exclude={"storage", "parallel", "lease_s", "base"})
        experiment = config_lib.load(self.base, self.fixed_overrides).to_dict()
        return {**{f"sweep: {k}": v for k, v in config_lib.flatten(spec).items()},
                **config_lib.flatten(experiment)}

    def fingerprint(self) -> str:
        """What makes two workers run the same sweep (not: storage, parallel, lease, paths)."""
        spec = self.spec.model_dump(mode="json", exclude={"storage", "parallel", "lease_s", "base"})
        base = config_lib.load(self.base).to_dict()
        blob = json.dumps([spec, base, self.fixed_overrides], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


# ----------------------------------------------------------------------------- loading


def _resolve_base(base: str, sweep_file: Path) -> Path:
    for candidate in (sweep_file.parent / base, Path(base)):
        if candidate.is_file():
            return candidate.resolve()
    raise ConfigError(f"{sweep_file}: base: experiment {base!r} not found next to the sweep file "
                      "or in the current directory")


def load(path: str | Path, cli_overrides: list[str] | tuple[str, ...] = (),
         check: bool = True) -> Sweep:
    """Read, validate and (by default) check a sweep file; any problem is one ConfigError line."""
    path = Path(path)
    raw = config_lib.read_yaml(path, "sweep", "base, search, objective, ...")
    raw.setdefault("name", path.stem)
    try:
        spec = config_lib.validate(raw, SweepSpec)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for item in cli_overrides:
        key = item.partition("=")[0]
        if key in spec.search.params or key in spec.derived or (
                swarm.source_of(key) in spec.search.sources):
            raise ConfigError(f"override {item!r}: {key} is swept or derived by {path}")
    sweep = Sweep(spec, path, _resolve_base(spec.base, path), tuple(cli_overrides))
    if check:
        sweep.check()
    return sweep
