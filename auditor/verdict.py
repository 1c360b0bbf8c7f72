"""The teacher's verdict on one generation's fast attribution, with a stated error rate (docs/methods.md §1, "Verdict").

Two questions, each judged against what the teacher itself can resolve:

1. *Is the fast top-k above random training images?* A one-sided rank test (Mann–Whitney U) of the teacher's
   influence on the fast top-k against the random controls. Under the null, the fast top-k are no more influential
   than random images, so their scores and the controls' are exchangeable, the teacher's noise included: the
   p-value needs no model of that noise. `auc` is the effect size, P(a top-k image outscores a control).
2. *Does the teacher rank the same images first?* mAP@k of the fast ranking against the teacher's top-k
   (`agreement`), placed between what a random ranking of the candidates reaches (`chance`) and what the
   teacher reaches against itself (`self_agreement`): relative agreement = (agreement − chance) /
   (self_agreement − chance), 0 at chance, 1 as good as a second run of the teacher. The teacher's self-agreement
   is a parametric bootstrap from the run's measured noise floor σ: the observed influence is signal plus noise
   of σ, so its spread overstates the signal's; the signal is the observed influence shrunk to the spread left
   after the noise's (√(var − σ²)), and two runs of the teacher are that signal plus independent noise of σ
   each. A teacher whose scores vary no more than its noise has no signal left: its self-agreement is chance.

`decide` turns these numbers into `confirmed`, `disputed` or `inconclusive` (pure; thresholds from [confirm]).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as _stats

from . import metrics

CONFIRMED, DISPUTED, INCONCLUSIVE = "confirmed", "disputed", "inconclusive"
VERDICTS = (CONFIRMED, DISPUTED, INCONCLUSIVE)
BOOTSTRAP = 200  # noisy replicates and random rankings per generation: the SE of a mean mAP is then ≲ 0.01
MAX_MULTIPLIER = 16  # the most timesteps a hint asks for, as a multiple of the run's


@dataclass(frozen=True)
class Thresholds:
    alpha: float = 0.01  # a p-value at or below it rejects "the fast top-k are like random images"
    min_self_agreement: float = 0.6  # below it the teacher cannot say, at these settings
    confirm_ratio: float = 0.2  # relative agreement at or above it (and p ≤ alpha) confirms
    dispute_ratio: float = 0.1  # relative agreement at or below it disputes: the teacher clearly prefers others


@dataclass(frozen=True)
class Stats:
    """The numbers behind a verdict, stored beside it (schemas/009_verdicts.sql)."""

    p_value: float  # one-sided Mann–Whitney, fast top-k above the controls
    auc: float  # P(top-k image outscores a control), ties halved; 0.5 = like random images
    agreement: float  # mAP@k of the fast ranking against the teacher's top-k
    chance: float  # mean mAP@k of random rankings of the same candidates
    self_agreement: float  # mean mAP@k of the teacher rescored under its own noise against its top-k
    noise_floor: float  # σ the self-agreement was drawn with (the generation's, in influence units)
    timesteps: int  # the teacher's setting that sets σ (AbU: [confirm] timesteps; D-TRAK: [dtrak] timesteps)
    self_agreement_by_multiplier: tuple[tuple[int, float], ...] = ()  # (m, self-agreement at σ/√m): for the hint

    @property
    def relative(self) -> float:
        headroom = self.self_agreement - self.chance
        return (self.agreement - self.chance) / headroom if headroom > 0 else float("nan")


@dataclass(frozen=True)
class Verdict:
    verdict: str
    reason: str
    hint: str | None  # the setting that would decide an inconclusive verdict


def rank_test(top: np.ndarray, controls: np.ndarray) -> tuple[float, float]:
    """(one-sided p, AUC): are `top` larger than `controls`? Exact null for small tie-free samples, else normal."""
    if len(top) == 0 or len(controls) == 0:
        return float("nan"), float("nan")
    result = _stats.mannwhitneyu(top, controls, alternative="greater")
    return float(result.pvalue), float(result.statistic / (len(top) * len(controls)))


def self_agreement(influence: np.ndarray, noise_floor: float, k: int, rng: np.random.Generator, scale: float = 1.0):
    """Mean mAP@k between two runs of the teacher whose scoring noise is σ·scale: each the estimated signal (the
    observed influence shrunk by its own noise of σ, see the module doc) plus independent noise. Treating the
    observed influence as the signal instead would let pure noise agree with itself well above chance."""
    ids = np.arange(len(influence))
    centred = influence - influence.mean()
    signal_var = max(0.0, float(np.var(influence)) - noise_floor**2)
    signal = centred * math.sqrt(signal_var / np.var(influence)) if signal_var > 0 else np.zeros_like(influence)
    sigma = noise_floor * scale

    def run() -> np.ndarray:
        return signal + rng.normal(0.0, sigma, len(influence))

    return float(np.mean([metrics.map_at_k(ids, run(), run(), k) for _ in range(BOOTSTRAP)]))


def chance_agreement(n: int, k: int, rng: np.random.Generator) -> float:
    ids, teacher = np.arange(n), np.arange(n, 0, -1).astype(float)
    return float(
        np.mean([metrics.map_at_k(ids, rng.permutation(n).astype(float), teacher, k) for _ in range(BOOTSTRAP)])
    )


def measure(
    fast: np.ndarray,
    influence: np.ndarray,
    is_control: np.ndarray,
    k: int,
    noise_floor: float,
    timesteps: int,
    seed: int = 0,
    min_self_agreement: float | None = None,
) -> Stats:
    """The stats of one generation: fast scores and teacher influence per candidate (fast top-K and controls alike).
    The fast top-k are the k highest fast scores; the controls are the random images outside them. With
    `min_self_agreement`, a teacher below it is also bootstrapped at σ/√m for m = 2, 4, … (the hint's figures)."""
    fast, influence, is_control = np.asarray(fast, float), np.asarray(influence, float), np.asarray(is_control, bool)
    k = min(k, len(fast))
    top = np.zeros(len(fast), bool)
    top[np.argsort(-fast, kind="stable")[:k]] = True
    p_value, auc = rank_test(influence[top], influence[is_control & ~top])
    rng = np.random.default_rng(seed)
    ids = np.arange(len(fast))
    floor = noise_floor if noise_floor and math.isfinite(noise_floor) and noise_floor > 0 else 0.0
    own = self_agreement(influence, floor, k, rng) if floor > 0 else 1.0
    by_multiplier = []
    if min_self_agreement is not None and own < min_self_agreement:
        m = 2
        while m <= MAX_MULTIPLIER:
            value = self_agreement(influence, floor, k, rng, 1 / math.sqrt(m))
            by_multiplier.append((m, value))
            if value >= min_self_agreement:
                break
            m *= 2
    return Stats(
        p_value=p_value,
        auc=auc,
        agreement=metrics.map_at_k(ids, fast, influence, k),
        chance=chance_agreement(len(fast), k, rng),
        self_agreement=own,
        noise_floor=floor,
        timesteps=timesteps,
        self_agreement_by_multiplier=tuple(by_multiplier),
    )


def decide(s: Stats, t: Thresholds, knob: str = "[confirm] timesteps") -> Verdict:
    """confirmed / disputed / inconclusive from a generation's stats (see the module doc and docs/methods.md §1)."""
    if not (s.self_agreement >= t.min_self_agreement) or not math.isfinite(s.relative):
        reaching = next((m for m, value in s.self_agreement_by_multiplier if value >= t.min_self_agreement), None)
        hint = (
            f"{knob} = {s.timesteps * reaching} (the teacher's self-agreement would reach {t.min_self_agreement:g})"
            if reaching
            else f"more than {knob} = {s.timesteps * MAX_MULTIPLIER}: the teacher's scores barely vary beyond its "
            "noise on this generation; more unlearning draws or another teacher"
        )
        return Verdict(
            INCONCLUSIVE,
            f"teacher too noisy: it agrees with itself at mAP@k {s.self_agreement:.2f} < {t.min_self_agreement:g}",
            hint,
        )
    controlled = math.isfinite(s.auc)  # without controls there is no rank test
    if controlled and not s.auc > 0.5:
        return Verdict(
            DISPUTED, f"the teacher ranks the fast top-k no higher than random images (AUC {s.auc:.2f})", None
        )
    if s.relative <= t.dispute_ratio:
        return Verdict(
            DISPUTED,
            f"the teacher prefers other images: agreement {s.relative:.2f} of its own (≤ {t.dispute_ratio:g})",
            None,
        )
    if not controlled:
        return Verdict(INCONCLUSIVE, "no random controls to test the fast top-k against", "[confirm] controls = 50")
    if s.p_value <= t.alpha and s.relative >= t.confirm_ratio:
        return Verdict(
            CONFIRMED,
            f"fast top-k above the controls (p = {s.p_value:.2g}) and agreement {s.relative:.2f} of the teacher's own",
            None,
        )
    if s.p_value > t.alpha:
        # Under the normal approximation, z grows with √(n_top·n_controls/(n_top+n_controls)); more controls help
        # until the top-k's own count dominates.
        return Verdict(
            INCONCLUSIVE,
            f"fast top-k above the controls but not significantly (p = {s.p_value:.2g} > {t.alpha:g})",
            "more [confirm] controls (a sharper rank test)",
        )
    return Verdict(
        INCONCLUSIVE,
        f"agreement {s.relative:.2f} of the teacher's own, between {t.dispute_ratio:g} and {t.confirm_ratio:g}",
        f"{knob} = {s.timesteps * 4} (a more precise teacher narrows the agreement's own noise)",
    )


def record(s: Stats, v: Verdict) -> dict:
    """The columns stored beside the verdict (confirmations, schemas/009_verdicts.sql)."""
    values = asdict(s)
    values.pop("self_agreement_by_multiplier")
    values.pop("timesteps")
    values.pop("agreement")  # stored as map_at_k
    return {
        "verdict": v.verdict,
        "verdict_reason": v.reason,
        "deciding_setting": v.hint,
        "relative_agreement": s.relative,
        **values,
    }
