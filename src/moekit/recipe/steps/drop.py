"""The ``drop_layers`` and ``drop_blocks`` steps: remove MoE sublayers, or whole decoder layers.

    steps:
      - type: drop_blocks      # whole decoder layers: a standard config with fewer layers
        count: 2               # or  layers: [5, 9]  (decoder layer indices of the input model)
        criterion: similarity  # or loss
      - type: drop_layers      # the MoE sublayer only; attention stays (moekit's format)
        count: 1

``criterion: similarity`` is the Unified MoE compression study's (He et al. 2024, arXiv
2406.02500): the layers (sublayers) whose output is most similar to their input on
calibration tokens — lowest mean 1 − cos(X, Y), `moekit.calib.blocks` — go first.
``loss`` drops those whose removal alone raises the calibration loss least (measured, one
stream per candidate). The report lists every candidate's score and the ones dropped.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from moekit.errors import MoekitError
from moekit.recipe.step import ModelInfo, Step, register_step


class _Drop(Step):
    """What both drops share: explicit ``layers``, or ``count`` chosen by ``criterion``."""

    layers: list[int] | None = Field(default=None, description="decoder layer indices of the input model")
    count: int | None = Field(default=None, ge=1, description="how many to choose by the criterion")
    criterion: Literal["similarity", "loss"] = "similarity"

    @model_validator(mode="after")
    def _one_choice(self) -> _Drop:
        if (self.layers is None) == (self.count is None):
            raise ValueError("give exactly one of 'layers' (decoder layer indices) or 'count' (how many to choose "
                             "on calibration data)")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)):
            raise ValueError("'layers' must list distinct decoder layer indices")
        return self

    def _stat(self) -> str:
        raise NotImplementedError

    def plan_needs(self) -> set[str]:
        return {self._stat()} if self.count is not None else set()

    def _valid(self, model: nn.Module, chosen: list[int], present: list[int], scores: dict) -> bool:
        """Whether the model can lose ``chosen`` (``present``: its layers not dropped
        before; ``scores``: the candidates)."""
        raise NotImplementedError

    def _candidates(self, model: nn.Module) -> list[int]:
        raise NotImplementedError

    def plan(self, model: nn.Module, stats) -> dict[int, dict]:
        """{candidate layer: {"score", "drop"}}: the ``count`` lowest scores that the model
        can lose (a drop the config cannot express is passed over)."""
        from moekit.methods.drop.allocate import choose_lowest

        name = self._stat()
        present = sorted(stats.layers)  # the layers an earlier step did not drop
        scores = {i: float(stats[i][name][0]) for i in self._candidates(model) if name in stats.layers.get(i, {})}
        chosen = choose_lowest(scores, self.count, allowed=lambda ids: self._valid(model, ids, present, scores))
        if len(chosen) < self.count:
            raise MoekitError(f"{self.name}: only {len(chosen)} of the {self.count} layers asked for can be dropped "
                              f"from this model (see the step's checks); lower count.")
        return {i: {"score": round(s, 8), "drop": i in chosen} for i, s in scores.items()}

    def dropped(self, plan) -> list[int]:
        if self.layers is not None:
            return sorted(self.layers)
        return sorted(int(i) for i, entry in (plan or {}).items() if entry["drop"])

    def shape_skeleton(self, skeleton: nn.Module) -> bool:
        """For `moekit.plan`: drop what the recipe names (False: calibration chooses)."""
        if self.layers is None:
            return False
        self._drop(skeleton, sorted(self.layers))
        return True

    def _drop(self, model: nn.Module, indices: list[int]) -> None:
        raise NotImplementedError

    def report_plan(self, plan) -> dict:
        out: dict = {"dropped": self.dropped(plan)}
        if plan:
            out["criterion"] = self.criterion
            out["scores"] = {str(i): entry["score"] for i, entry in sorted(plan.items())}
        return out

    @property
    def counts_known_in_advance(self) -> bool:
        return True


@register_step
class DropBlocks(_Drop):
    """Remove whole decoder layers: a standard checkpoint with fewer layers."""

    name = "drop_blocks"
    type: Literal["drop_blocks"] = "drop_blocks"

    def _stat(self) -> str:
        return "block_change" if self.criterion == "similarity" else "block_loss"

    def check(self, info: ModelInfo) -> None:
        from moekit.arch.renumber import renumbered_config

        n = int(info.config.num_hidden_layers)
        if self.count is not None and self.count >= n:
            raise MoekitError(f"drop_blocks: count={self.count} would drop every one of the {n} decoder layers; "
                              f"choose a count below {n}.")
        if self.layers is not None:
            bad = sorted(i for i in self.layers if not 0 <= i < n)
            if bad:
                raise MoekitError(f"drop_blocks: layers {bad} do not exist; the model has decoder layers "
                                  f"0..{n - 1}.")
            try:
                renumbered_config(info.config, [i for i in range(n) if i not in self.layers])
            except MoekitError as exc:
                raise MoekitError(f"drop_blocks: {exc}") from None

    def _candidates(self, model: nn.Module) -> list[int]:
        from moekit.arch.discover import decoder_layers

        return [info.index for info in decoder_layers(model)]

    def _valid(self, model: nn.Module, chosen: list[int], present: list[int], scores: dict) -> bool:
        from moekit.arch.renumber import renumbered_config

        try:
            renumbered_config(model.config, [i for i in present if i not in chosen])
        except MoekitError:
            return False
        return True

    def _drop(self, model: nn.Module, indices: list[int]) -> None:
        from moekit.arch.edit import drop_blocks

        drop_blocks(model, indices)

    def blocks_dropped(self, plan) -> set[int]:
        return set(self.dropped(plan))

    def apply_layer(self, model: nn.Module, layer, stats, *, plan=None, on_progress=None) -> dict:
        return {}  # the pass leaves a dropped block out of the stream and the output (`blocks_dropped`)

    def apply(self, model: nn.Module, stats, *, progress: bool = False) -> dict:
        """On a model in memory: remove the layers (``stats``: the planning statistics of
        every decoder layer, when ``count`` chooses them)."""
        from moekit.arch.edit import drop_blocks

        plan = self.plan(model, stats) if self.plan_needs() else None
        drop_blocks(model, self.dropped(plan))
        return self.report_plan(plan)


@register_step
class DropLayers(_Drop):
    """Remove the MoE sublayer (router, routed and shared experts) of decoder layers; their
    attention stays. No transformers config can say "no MLP here", so the output is in
    moekit's format (`moekit.io.nonuniform`), which `moekit.load` restores."""

    name = "drop_layers"
    type: Literal["drop_layers"] = "drop_layers"

    def _stat(self) -> str:
        return "mlp_change" if self.criterion == "similarity" else "mlp_loss"

    def check(self, info: ModelInfo) -> None:
        from moekit.arch.renumber import moe_layer_indices

        moe = moe_layer_indices(info.config)
        if self.count is not None and self.count >= len(moe):
            raise MoekitError(f"drop_layers: count={self.count} would drop the MoE sublayer of every one of the "
                              f"{len(moe)} MoE layers; choose a count below {len(moe)}.")
        if self.layers is not None:
            unknown = sorted(set(self.layers) - set(moe))
            if unknown:
                raise MoekitError(f"drop_layers: layers {unknown} have no MoE sublayer to drop; MoE layers are "
                                  f"{moe}.")
            if set(self.layers) >= set(moe):
                raise MoekitError(f"drop_layers: dropping the MoE sublayers of all MoE layers {moe} leaves no "
                                  "MoE; keep at least one (to remove whole layers, use drop_blocks).")

    def _candidates(self, model: nn.Module) -> list[int]:
        from moekit.arch.discover import moe_layers

        return [layer.index for layer in moe_layers(model)]

    def _valid(self, model: nn.Module, chosen: list[int], present: list[int], scores: dict) -> bool:
        return len(chosen) < len(scores)

    def writes_native(self, model: nn.Module, plan) -> bool:
        return bool(self.dropped(plan))

    def _drop(self, model: nn.Module, indices: list[int]) -> None:
        from moekit.arch.edit import drop_mlp

        drop_mlp(model, indices)

    def apply_layer(self, model: nn.Module, layer, stats, *, plan=None, on_progress=None) -> dict:
        from moekit.arch.edit import drop_mlp

        if layer.index not in self.dropped(plan):
            return {}
        drop_mlp(model, [layer.index])
        return {}
