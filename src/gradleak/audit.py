"""`gradleak audit`, the main job: what does an honest-but-curious server recover from one client's
update, with and without a defence, where does the leak stop, what epsilon is that, and what does it
cost?

The audit runs each attack (by default the exact attack and TAG, a gradient-matching attack) on the
same private batch twice, once on the plain update and once on the defended one. Then, for each
attack that leaks without a defence, it scans the strength of the audited defence
(`gradleak.threshold`: a coarse grid, then bisection) for the weakest setting at which the leak
stops, and reports epsilon there for one round and for the deployment (`rounds` rounds at sample
rate `sample_rate`), and the held-out accuracy that noise costs in a short training run of the same
victim against no noise. For every DP run it puts the reconstruction success the mechanism allows
(`gradleak.rero`, at the prior `prior_success`) beside the measured success: the fraction of the
batch's sentences recovered exactly. A canary audit of the audited defence (`gradleak.canary`,
`canary_trials` trials) puts the epsilon the attack proves beside the accountant's. It stores every
run and sums up in a verdict of plain sentences and an HTML report.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gradleak.errors import GradleakError
from gradleak.knowledge import Knows
from gradleak.spec import DEFAULT_PRIOR
from gradleak.sweeps.jobs import Job
from gradleak.threshold import DEFAULT_BISECT, DEFAULT_LEAK_ROUGE, Knob, LeakCriterion, ThresholdScan

if TYPE_CHECKING:  # the report's modules load matplotlib: only when a report is drawn
    from gradleak.canary import CanaryProgress, CanaryResult
    from gradleak.report.data import AttackRun, ReportData
    from gradleak.store import StoredRun

log = logging.getLogger(__name__)

DEFAULT_VICTIM = "gpt2-tiny"
DEFAULT_DATA = "sst2"
DEFAULT_BATCH_SIZE = 4
DEFAULT_ATTACKS = ("exact", "tag")
DEFAULT_DEFENSES = ("dp-sgd:clip=1,multiplier=1",)
DEFAULT_ITERATIONS = 50
DEFAULT_ROUNDS = 100
DEFAULT_SAMPLE_RATE = 1.0
DEFAULT_UTILITY_STEPS = 10
DEFAULT_UTILITY_EVAL = 256
DEFAULT_CANARY_TRIALS = 30  # the canary audit beside the accountant's epsilon (0: skip it)
CANARY_CONFIDENCE = 0.95


@dataclass(frozen=True)
class AuditSpec:
    victim: str = DEFAULT_VICTIM
    data: str = DEFAULT_DATA
    text_column: str | None = None
    label_column: str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    defenses: tuple[str, ...] = DEFAULT_DEFENSES
    iterations: int = DEFAULT_ITERATIONS
    seed: int = 0
    device: str = "cpu"
    time_budget: float = 60.0
    max_words: int | None = None
    delta: float = 1e-5
    accountant: str = "rdp"
    knows: Knows = Knows()  # what the server knows of the batch (`--knows`): the runs' known_* fields
    prior: str = DEFAULT_PRIOR  # the language prior of the attacks that read one (lamp, exact-robust)
    # the threshold scan and the deployment it is accounted for
    scan: bool = True
    leak_rouge1: float = DEFAULT_LEAK_ROUGE  # leakage stops below this ROUGE-1 (and no sentence exact)
    bisect: int = DEFAULT_BISECT
    rounds: int = DEFAULT_ROUNDS
    sample_rate: float = DEFAULT_SAMPLE_RATE
    # the utility of the noise: short training runs of the same victim
    utility: bool = True
    utility_steps: int = DEFAULT_UTILITY_STEPS
    utility_eval: int = DEFAULT_UTILITY_EVAL
    prior_success: float | None = None  # None: one sentence out of the data set's candidates
    canary_trials: int = DEFAULT_CANARY_TRIALS  # trials of the canary audit of the audited defence; 0: none

    def validate(self) -> None:
        from gradleak.privacy import check_delta, check_sample_rate
        from gradleak.rero import check_prior

        if not self.attacks:
            raise GradleakError("the audit needs at least one attack")
        if not self.defenses:
            raise GradleakError("the audit compares a defence with none: give at least one --defense")
        LeakCriterion(self.leak_rouge1)
        if self.bisect < 0:
            raise GradleakError(f"bisection steps must be at least 0, got {self.bisect}")
        if self.rounds < 1:
            raise GradleakError(f"rounds must be at least 1, got {self.rounds}")
        check_sample_rate(self.sample_rate)
        check_delta(self.delta)
        if self.utility_steps < 1:
            raise GradleakError(f"utility steps must be at least 1, got {self.utility_steps}")
        if self.utility_eval < 1:
            raise GradleakError(f"utility evaluation needs at least 1 sentence, got {self.utility_eval}")
        if self.prior_success is not None:
            check_prior(self.prior_success)
        if self.canary_trials:
            from gradleak.canary_stats import min_trials

            least = min_trials(delta=self.delta, confidence=CANARY_CONFIDENCE)
            if self.canary_trials < least:
                raise GradleakError(
                    f"the canary audit needs at least {least} trials to certify anything at "
                    f"{CANARY_CONFIDENCE:.0%} confidence, got {self.canary_trials} (0 skips it)"
                )

    @property
    def canary_attack(self) -> str:
        """The attack that decides the canary trials: the exact attack where the audit runs it (cheap
        and decisive), else the first attack."""
        return "exact" if "exact" in self.attacks else self.attacks[0]

    def run_spec(self, attack: str, chain: tuple[str, ...]):  # -> gradleak.experiment.RunSpec
        from gradleak.experiment import RunSpec

        spec = RunSpec(
            victim=self.victim,
            data=self.data,
            text_column=self.text_column,
            label_column=self.label_column,
            batch_size=self.batch_size,
            attack=attack,
            iterations=self.iterations,
            seed=self.seed,
            device=self.device,
            time_budget=self.time_budget,
            max_words=self.max_words,
            defenses=chain,
            delta=self.delta,
            accountant=self.accountant,
            prior=self.prior,
            **self.knows.spec_fields(),
        )
        spec.validate()
        return spec

    def train_job(self, chain: tuple[str, ...]) -> Job:
        """A short training run of the audited victim under `chain` (plain SGD, no bound estimate)."""
        from gradleak.train import TrainSpec

        spec = TrainSpec(
            victim=self.victim,
            data=self.data,
            text_column=self.text_column,
            label_column=self.label_column,
            batch_size=self.batch_size,
            steps=self.utility_steps,
            eval_every=self.utility_steps,
            max_eval=self.utility_eval,
            bound=False,
            seed=self.seed,
            device=self.device,
            defenses=chain,
            delta=self.delta,
            accountant=self.accountant,
        )
        spec.validate()
        return Job("train", spec)

    def jobs(self) -> list[Job]:
        """Every attack on the plain update, then on the defended one; all specs validated."""
        self.validate()
        return [
            Job("attack", self.run_spec(attack, chain))
            for chain in ((), self.defenses)
            for attack in self.attacks
        ]


def _strongest(runs: Sequence[AttackRun]) -> AttackRun | None:
    return max(runs, key=lambda r: (r.scores["rouge1"], r.scores["exact_match"]), default=None)


def _recovered(run: AttackRun) -> str:
    n = run.batch_size
    exact = round(run.scores["exact_match"] * n / 100)
    sentences = "sentence" if n == 1 else "sentences"
    return (
        f"recovers {exact}/{n} {sentences} exactly (ROUGE-1 {run.scores['rouge1']:.0f}, {run.attack} attack)"
    )


def verdict(spec: AuditSpec, data: ReportData) -> list[str]:
    """Two plain sentences: what the server recovers without and with the defence, and the epsilon."""
    chain = ",".join(spec.defenses)
    plain = _strongest([r for r in data.attacks if not r.defenses])
    defended = _strongest([r for r in data.attacks if r.defenses == spec.defenses])
    out = []
    if plain is None:
        out.append("Without a defence no attack finished (see the failed runs).")
    else:
        out.append(f"Without a defence the server {_recovered(plain)}.")
    if defended is None:
        out.append(f"With {chain} no attack finished (see the failed runs).")
    else:
        if defended.epsilon is None:
            privacy = "no finite epsilon: not a DP mechanism"
        else:
            privacy = f"epsilon {defended.epsilon:.3g} at delta {defended.delta:g}, {defended.accountant}"
        out.append(f"With {chain} ({privacy}) it {_recovered(defended)}.")
    if data.failed:
        out.append(f"{len(data.failed)} of {len(spec.attacks) * 2} runs failed; the report lists why.")
    return out


# ------------------------------------------------------------------ the threshold, its epsilon, its cost

RunJobs = Callable[[Sequence[Job]], "list[StoredRun]"]  # runs jobs (store, executor, progress): rows


@dataclass(frozen=True)
class Threshold:
    """Where one attack's leak stops (`scan`), its epsilon for one round and for the deployment, and
    the held-out accuracy training at that strength costs against no noise (points, 0-100)."""

    attack: str
    defence: str  # the strength scanned, in words ("DP-SGD multiplier")
    scan: ThresholdScan
    chain: tuple[str, ...] | None = None  # the defence chain at the threshold
    epsilon: float | None = None
    epsilon_deployment: float | None = None
    privacy_note: str = ""  # why epsilon is None, when it is
    utility_cost: float | None = None
    accuracy: float | None = None  # held-out accuracy (0-1) at the threshold

    @property
    def strength(self) -> float | None:
        return self.scan.strength if self.scan.status == "stops" else None

    def to_json(self) -> dict[str, Any]:
        return {
            "defence": self.defence,
            "strength": self.strength,
            "chain": None if self.chain is None else list(self.chain),
            "status": self.scan.status,
            "note": self.scan.note,
            "leaks_at": self.scan.below,
            "epsilon": self.epsilon,
            "epsilon_deployment": self.epsilon_deployment,
            "privacy_note": self.privacy_note,
            "utility_cost": self.utility_cost,
            "accuracy": self.accuracy,
            "scan": [
                {"strength": p.strength, "rouge1": p.rouge1, "exact_match": p.exact_match, "leaks": p.leaks}
                for p in self.scan.points
            ],
        }


@dataclass(frozen=True)
class Utility:
    """Held-out accuracy (0-1) of the short training runs: without noise, and under the audited chain."""

    steps: int
    plain: float | None
    audited: float | None
    eval_size: int

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "eval_size": self.eval_size,
            "accuracy_without_noise": self.plain,
            "accuracy_audited": self.audited,
            "cost_audited": self.cost(self.audited),
        }

    def cost(self, accuracy: float | None) -> float | None:
        if self.plain is None or accuracy is None:
            return None
        return 100 * (self.plain - accuracy)


@dataclass(frozen=True)
class Prior:
    """The prior success kappa of the reconstruction bound, and where it comes from, in words."""

    kappa: float
    why: str


@dataclass(frozen=True)
class AuditResult:
    rows: tuple[StoredRun, ...]  # every run the audit made: attacks (plain, defended, scan) and training
    thresholds: tuple[Threshold, ...]
    knob: Knob | None
    prior: Prior
    bounds: dict[str, dict[str, Any]]  # run key -> reconstruction bound and measured success
    utility: Utility | None
    bound_curve: tuple[tuple[float, float], ...] = ()  # (one-round epsilon, bound) over the scanned range
    leak_rouge1: float = DEFAULT_LEAK_ROUGE
    canary: CanaryResult | None = None  # the canary audit of the audited defence
    canary_error: str = ""  # why there is no canary audit, when it was asked for and could not run


def measured_success(record: dict[str, Any]) -> float:
    """The fraction of the batch's sentences the attack recovered exactly (0-1)."""
    return float(record["scores"]["exact_match"]) / 100


def default_prior(spec: AuditSpec) -> Prior:
    """kappa = 1 / (N - B + 1): the batch is B distinct sentences drawn uniformly from the N candidates
    of the data set (within --max-words); an adversary who knows the other B - 1 and the pool guesses
    the remaining one with that chance. --prior-success overrides it."""
    from gradleak.data import filter_by_words
    from gradleak.rero import uniform_prior

    if spec.prior_success is not None:
        return Prior(spec.prior_success, f"kappa = {spec.prior_success:g}, as given (--prior-success)")
    texts = {
        e.text for e in filter_by_words(spec.run_spec(spec.attacks[0], ()).examples(), 0, spec.max_words)
    }
    n = len(texts)
    others = "" if spec.batch_size == 1 else f" when the other {spec.batch_size - 1} of the batch are known"
    kappa = uniform_prior(max(2, n - spec.batch_size + 1))
    why = (
        f"kappa = 1/{round(1 / kappa)}: the chance of guessing one private sentence out of the {n} candidate "
        f"sentences of {spec.data}{others} (the batch is drawn uniformly from them; --prior-success "
        "sets another)"
    )
    return Prior(kappa, why)


def _scores(row: StoredRun) -> tuple[float, float] | None:
    if row.refused:  # the attack declined the scenario: it recovers nothing
        return (0.0, 0.0)
    if not row.done or row.record is None:
        return None
    s = row.record["scores"]
    return float(s["rouge1"]), float(s["exact_match"])


def _mechanisms(record: dict[str, Any]):  # -> tuple[Mechanism, ...] | None
    from gradleak.privacy import Mechanism

    privacy = record.get("privacy") or {}
    if privacy.get("epsilon") is None or not privacy.get("mechanisms"):
        return None
    return tuple(
        Mechanism(m["kind"], float(m["noise_multiplier"]), float(m["sample_rate"]), int(m["steps"]))
        for m in privacy["mechanisms"]
    )


def _deployment_epsilon(spec: AuditSpec, record: dict[str, Any]) -> float | None:
    from gradleak.privacy import Mechanism, account

    mechs = _mechanisms(record)
    if mechs is None:
        return None
    deployed = [Mechanism(m.kind, m.noise_multiplier, spec.sample_rate, spec.rounds) for m in mechs]
    eps = account(deployed, spec.delta, spec.accountant)
    return eps if math.isfinite(eps) else None


def run_audit(
    spec: AuditSpec, run_jobs: RunJobs, canary_progress: CanaryProgress | None = None
) -> AuditResult:
    """The whole audit: the plain and defended runs, each leaking attack's threshold scan, the training
    runs for utility, and the reconstruction bound of every DP run. `run_jobs` runs a list of jobs and
    returns their rows (in any order); the CLI passes one that stores them and shows progress."""
    from gradleak.rero import reconstruction_bound
    from gradleak.threshold import knob_of, scan

    base_jobs = spec.jobs()
    rows: dict[str, StoredRun] = {r.key: r for r in run_jobs(base_jobs)}
    knob = knob_of(spec.defenses)
    criterion = LeakCriterion(spec.leak_rouge1)
    thresholds: list[Threshold] = []
    at: dict[tuple[str, float], StoredRun] = {}
    if knob is not None and spec.scan:
        for attack in spec.attacks:
            plain = rows.get(Job("attack", spec.run_spec(attack, ())).key)
            got = None if plain is None else _scores(plain)

            def evaluate(value: float, attack: str = attack) -> tuple[float, float] | None:
                job = Job("attack", spec.run_spec(attack, knob.at(value)))
                row = rows.get(job.key)
                if row is None:
                    ran = run_jobs([job])
                    if not ran:  # the runner gave nothing back: count it as a failed run
                        return None
                    row = ran[0]
                rows[row.key] = row
                at[(attack, value)] = row
                return _scores(row)

            if got is None:
                result = ThresholdScan(attack, "failed", None, None, (), "the run without a defence failed")
            else:
                result = scan(knob, attack, criterion.leaks(*got), evaluate, criterion, bisect=spec.bisect)
            log.info("%s: %s at %s %s", attack, result.status, knob.label, result.strength)
            thresholds.append(Threshold(attack, knob.label, result))
    # epsilon at each threshold, one round and deployed
    done: list[Threshold] = []
    for t in thresholds:
        if t.strength is None:
            done.append(t)
            continue
        row = at[(t.attack, t.strength)]
        record = row.record or {}
        privacy = record.get("privacy") or {}
        eps = privacy.get("epsilon")
        note = "" if eps is not None else str(privacy.get("reason") or "no DP mechanism")
        done.append(
            Threshold(
                t.attack,
                t.defence,
                t.scan,
                chain=knob.at(t.strength) if knob else None,
                epsilon=eps,
                epsilon_deployment=_deployment_epsilon(spec, record),
                privacy_note=note,
            )
        )
    thresholds = done
    # utility: no noise, the audited chain, and each threshold's chain; only where some leak stops
    # (the verdict's cost is of a threshold and of your setting measured against it)
    utility = None
    if spec.utility and any(t.chain for t in thresholds):
        chains = {(): None, spec.defenses: None, **{t.chain: None for t in thresholds if t.chain}}
        train_jobs = {chain: spec.train_job(chain) for chain in chains}
        for row in run_jobs(list(train_jobs.values())):
            rows[row.key] = row

        def accuracy(chain: tuple[str, ...]) -> float | None:
            row = rows.get(train_jobs[chain].key)
            if row is None or row.record is None or row.record.get("final_accuracy") is None:
                return None
            return float(row.record["final_accuracy"])

        first = rows.get(train_jobs[()].key)
        eval_size = int((first.record or {}).get("eval_size", 0)) if first is not None else 0
        utility = Utility(spec.utility_steps, accuracy(()), accuracy(spec.defenses), eval_size)
        thresholds = [
            t
            if t.chain is None
            else Threshold(
                t.attack,
                t.defence,
                t.scan,
                t.chain,
                t.epsilon,
                t.epsilon_deployment,
                t.privacy_note,
                utility.cost(accuracy(t.chain)),
                accuracy(t.chain),
            )
            for t in thresholds
        ]
    # the reconstruction bound of every DP run
    prior = default_prior(spec)
    bounds: dict[str, dict[str, Any]] = {}
    for row in rows.values():
        if row.kind != "attack" or row.record is None:
            continue
        mechs = _mechanisms(row.record)
        if mechs is None:
            continue
        b = reconstruction_bound(mechs, prior.kappa)
        bounds[row.key] = {
            "reconstruction_bound": b.to_json(),
            "measured_success": measured_success(row.record),
        }
    curve = bound_curve(
        spec, [m for r in rows.values() if r.record for m in (_mechanisms(r.record) or ())], prior
    )
    canary, canary_error = _canary(spec, canary_progress)
    return AuditResult(
        tuple(rows.values()),
        tuple(thresholds),
        knob,
        prior,
        bounds,
        utility,
        curve,
        spec.leak_rouge1,
        canary,
        canary_error,
    )


def _canary(spec: AuditSpec, progress: CanaryProgress | None) -> tuple[CanaryResult | None, str]:
    """The canary audit (`gradleak.canary`) of the audited defence on the audit's victim, data and batch
    size: the epsilon the attack proves, beside the accountant's. Its own refusals (a threat model it
    cannot audit) come back as the reason, not as a failed audit."""
    if not spec.canary_trials:
        return None, ""
    from gradleak.canary import run_canary_audit

    try:
        result = run_canary_audit(
            victim=spec.victim,
            data=spec.data,
            text_column=spec.text_column,
            label_column=spec.label_column,
            batch_size=spec.batch_size,
            attack=spec.canary_attack,
            defenses=spec.defenses,
            trials=spec.canary_trials,
            seed=spec.seed,
            device=spec.device,
            delta=spec.delta,
            accountant=spec.accountant,
            confidence=CANARY_CONFIDENCE,
            dtype=spec.run_spec(spec.canary_attack, ()).dtype,  # as the audit's runs
            max_words=spec.max_words,
            iterations=spec.iterations,
            time_budget=spec.time_budget,
            knows=spec.knows,
            progress=progress,
        )
    except GradleakError as e:
        log.warning("canary audit not run: %s", e)
        return None, str(e)
    return result, ""


def bound_curve(
    spec: AuditSpec, mechs: Sequence[Any], prior: Prior, points: int = 40
) -> tuple[tuple[float, float], ...]:
    """(epsilon, bound) of one release over the range of noise multipliers the DP runs had (one kind
    of mechanism, one release each): the bound as a curve of epsilon for the report."""
    from gradleak.privacy import Mechanism, account
    from gradleak.rero import reconstruction_bound

    kinds = {m.kind for m in mechs}
    zs = [m.noise_multiplier for m in mechs if m.noise_multiplier > 0]
    if len(kinds) != 1 or len(set(zs)) < 2:
        return ()
    kind = kinds.pop()
    lo, hi = math.log10(min(zs)), math.log10(max(zs))
    out = []
    for i in range(points):
        z = 10 ** (lo + (hi - lo) * i / (points - 1))
        m = Mechanism(kind, z)
        try:
            eps = account([m], spec.delta, spec.accountant)
        except GradleakError:  # e.g. the classic bound outside its range
            continue
        if math.isfinite(eps):
            out.append((eps, reconstruction_bound([m], prior.kappa).bound))
    return tuple(sorted(out))


# ------------------------------------------------------------------ the threshold's verdict


def _g(x: float) -> str:
    return f"{x:.3g}"


def _eps_words(eps: float | None, note: str = "") -> str:
    return f"epsilon {_g(eps)}" if eps is not None else f"no finite epsilon: {note or 'not a DP mechanism'}"


def threshold_verdict(spec: AuditSpec, result: AuditResult, data: ReportData) -> list[str]:
    """Per attack, in plain words: what it recovers without a defence, where it stops, the epsilon
    there (one round; the deployment), how far the audited setting is past it and what it costs."""
    knob = result.knob
    if knob is None:
        chain = ",".join(spec.defenses)
        return [f"{chain} has no strength to scan (only noise and pruning have one): no threshold."]
    if not spec.scan:
        return []
    out = []
    own = knob.value
    own_run = _strongest([r for r in data.attacks if r.defenses == spec.defenses])
    own_eps = _eps_words(own_run.epsilon if own_run else None, "not a DP mechanism")
    short = knob.family.key
    for t in result.thresholds:
        plain = [r for r in data.attacks if not r.defenses and r.attack == t.attack]
        head = f"The {t.attack} attack " + (_recovered_plain(plain[0]) if plain else "did not finish")
        s = t.scan
        if s.status == "no-leak":
            out.append(f"{head} without a defence: no leak to stop.")
            continue
        if s.status == "leaks":
            out.append(
                f"{head} without a defence. It still leaks at {t.defence} {_g(s.below or 0)}, "
                "the strongest setting tried."
            )
            continue
        if s.status == "failed":
            out.append(f"{head} without a defence. Its scan stopped: {s.note}.")
            continue
        z = t.strength or 0.0
        if z == 0:
            out.append(
                f"{head} without a defence. It recovers nothing through {','.join(spec.defenses)} even at "
                f"{t.defence} 0: the rest of the chain stops it, not the noise, so there is no noise "
                "threshold (and no finite epsilon there)."
            )
            continue
        at = "at or below" if s.below is None else "at"  # or below: the grid's floor already stopped it
        deployed = (
            f"; {_g(t.epsilon_deployment)} over {spec.rounds} rounds at q = {spec.sample_rate:g}"
            if t.epsilon_deployment is not None
            else ""
        )
        eps = _eps_words(t.epsilon, t.privacy_note)
        where = f"It stops {at} {t.defence} {_g(z)} ({eps} for one round{deployed})."
        if own >= z:
            ratio = own / z if knob.family.log else None
            far = f"is {_g(ratio)} times past it" if ratio is not None else "is past it"
        else:
            far = f"falls short of it ({_g(own / z)} times the threshold): the attack leaks there"
        cost = ""
        u = result.utility
        if u is not None and u.audited is not None and u.plain is not None:
            cost = (
                f" and costs {u.cost(u.audited):.1f} points of held-out accuracy "
                f"({100 * u.audited:.1f}% against {100 * u.plain:.1f}% without noise, "
                f"{u.steps} SGD steps, {u.eval_size} held-out sentences)"
            )
        mine = f"Your setting, {short} {_g(own)} ({own_eps}), {far}{cost}."
        lines = [f"{head} without a defence.", where, mine]
        if t.utility_cost is not None:
            lines.append(f"At the threshold training loses {t.utility_cost:.1f} points.")
        out.append(" ".join(lines))
    return out


def _recovered_plain(run: AttackRun) -> str:
    n = run.batch_size
    exact = round(run.scores["exact_match"] * n / 100)
    unit = "sentence" if n == 1 else "sentences"
    return f"recovers {exact}/{n} {unit} exactly (ROUGE-1 {run.scores['rouge1']:.0f})"


def bound_verdict(result: AuditResult, data: ReportData, defenses: tuple[str, ...]) -> list[str]:
    """The reconstruction bound of the audited setting against the strongest attack's success there."""
    runs = [r for r in data.attacks if r.defenses == defenses and r.key in result.bounds]
    if not runs:
        return []
    best = max(runs, key=lambda r: result.bounds[r.key]["measured_success"])
    b = result.bounds[best.key]
    bound = b["reconstruction_bound"]
    return [
        f"At your setting DP allows a reconstruction attack at most {100 * bound['bound']:.3g}% success "
        f"per sentence ({bound['method']}, prior {result.prior.kappa:.3g}); the {best.attack} attack "
        f"recovered {100 * b['measured_success']:.0f}% exactly. Prior: {result.prior.why}."
    ]


def canary_verdict(result: AuditResult) -> list[str]:
    """What the canary audit proves about epsilon, beside what the accountant promises."""
    if result.canary_error:
        return [f"Canary audit not run: {result.canary_error}."]
    c = result.canary
    if c is None:
        return []
    upper = (
        f"the accountant's epsilon for the same release is {c.epsilon_upper:.3g} ({c.accountant}, "
        "replace-one: the canary takes another sentence's place)"
        if c.epsilon_upper is not None
        else f"the accountant gives no finite epsilon ({c.epsilon_upper_reason})"
    )
    proved = (
        f"proves epsilon >= {c.epsilon_lower:.3g}" if c.epsilon_lower > 0 else "certifies no positive epsilon"
    )
    line = (
        f"Canary audit ({c.trials} trials, the {c.attack} attack deciding whether the canary was in the "
        f"batch: {c.false_negatives}/{c.in_trials} missed, {c.false_positives}/{c.out_trials} false "
        f"alarms): it {proved} at {c.confidence:.0%} confidence (at most {c.epsilon_ceiling:.3g} with "
        f"{c.trials} trials); {upper}."
    )
    if not c.consistent():
        line += " The lower bound is above the upper one: a bug in the attack's audit or the accountant."
    return [line]


def report_data(result: AuditResult, data: ReportData) -> ReportData:
    """The report's data with the audit's thresholds and reconstruction bounds for its plots."""
    import dataclasses

    from gradleak.report.data import BoundPoint, CanaryMark, ThresholdMark

    leak = result.leak_rouge1
    marks = tuple(
        ThresholdMark(t.attack, t.defence, t.scan.status, t.strength, t.epsilon, t.utility_cost, leak)
        for t in result.thresholds
    )
    points = tuple(
        BoundPoint(
            r.key,
            r.attack,
            r.epsilon,
            result.bounds[r.key]["reconstruction_bound"]["bound"],
            result.bounds[r.key]["measured_success"],
            result.prior.kappa,
        )
        for r in data.attacks
        if r.key in result.bounds and r.epsilon is not None
    )
    canary = None
    if result.canary is not None:
        c = result.canary
        canary = CanaryMark(
            " -> ".join(c.defenses) or "none",
            c.attack,
            c.epsilon_lower,
            c.epsilon_ceiling,
            c.epsilon_upper,
            c.accountant,
            c.trials,
            c.confidence,
        )
    return dataclasses.replace(
        data, thresholds=marks, bounds=points, bound_curve=result.bound_curve, canary=canary
    )
