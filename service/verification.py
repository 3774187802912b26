"""Same person or not: the decision rule behind ``POST /verify`` and each match's ``same_person``.

The threshold is REID_VERIFY_THRESHOLD when set (a user who calibrated on their own cameras), else the one
the model file carries (``reid.verification``, written by ``python -m training calibrate``, with the
false-match rate it was chosen for and the ROC it came from), else there is none and the answer is null
rather than a guess. The rule: the same person when the score (mean over branches of the cosine) > threshold.
"""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from model_zoo.contract import ModelContract


@dataclass(frozen=True)
class SamePersonRule:
    threshold: Optional[float] = None
    source: Optional[str] = None  # "setting" or "model"
    calibration: Dict[str, Any] = field(default_factory=dict)  # the model's record, without its ROC

    @classmethod
    def choose(cls, contract: ModelContract, setting: Optional[float]) -> "SamePersonRule":
        calibration = {k: v for k, v in contract.verification.items() if k != "roc"}
        if setting is not None:
            return cls(setting, "setting", calibration)
        if "threshold" in contract.verification:
            return cls(float(contract.verification["threshold"]), "model", calibration)
        return cls(calibration=calibration)

    def describe(self) -> Optional[Dict[str, Any]]:
        """Where the threshold came from, for an answer that carries its decisions; None without one."""
        if self.threshold is None:
            return None
        calibrated = self.source == "model"
        return {
            "threshold": self.threshold,
            "source": self.source,
            "calibrated_on": self.calibration.get("calibrated_on") if calibrated else None,
            "target_fmr": self.calibration.get("target_fmr") if calibrated else None,
        }

    def decide(self, score: float) -> Optional[bool]:
        return None if self.threshold is None else score > self.threshold
