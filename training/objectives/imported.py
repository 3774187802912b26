"""Fine-tuning an imported model: ``openvino_ir``, CAMA's identification and triplet terms on its one branch
(with one branch there is no overlapped activation penalty); ``openvino_ir_cama``, CAMA's objective as it is."""

from typing import Dict

from training.objectives.base import OBJECTIVE_REGISTRY
from training.objectives.cama import CAMAObjective

OBJECTIVE_REGISTRY.register("openvino_ir_cama")(CAMAObjective)


@OBJECTIVE_REGISTRY.register("openvino_ir")
class ImportedFineTuneObjective(CAMAObjective):
    def default_weights(self) -> Dict[str, float]:
        return {"loss_id": 1.0, "loss_tri": self.cfg.loss.triplet_weight}
