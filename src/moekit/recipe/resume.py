"""A recipe pass's records in its work folder (`moekit.io.workdir.WorkFolder`): what each
finished layer became, written when the layer is done, and replayed by a resumed run so
its skeleton, reports and router digests are those of an uninterrupted one."""

from __future__ import annotations

import os

from torch import nn

from moekit.arch.layout import FACTORED_KEY, dropped_mlp_layers, factored_record


def commit_layer(work, model: nn.Module, index: int, view, streams: list, result, routers_before: list[int]) -> None:
    """Record finished layer ``index`` (as the steps left it: ``view``, None for a dense
    one) with the streams' hidden states after it, atomically."""
    folder = work.hidden_folder(index)
    partial = folder.with_name(folder.name + ".partial")
    for stream in streams:
        stream.save(partial)
    os.replace(partial, folder)
    work.commit(index, {
        "reports": {str(pos): layers[index] for pos, layers in result.per_layer.items() if index in layers},
        "experts": view.num_experts if view is not None else None,
        "top_k": view.top_k if view is not None else None,
        "mlp_dropped": index in dropped_mlp_layers(model.config),
        "factored": factored_record(model.config, index),
        "routers": [d.routers[-1] if len(d.routers) > before else None  # the phases that saw its router
                    for d, before in zip(result.digests, routers_before, strict=True)],
        "seconds": result.seconds,
    })


def replay_finished(work, model: nn.Module, result, last: int) -> int:
    """Replay the records of the finished layers into ``result`` and ``model``: reports,
    router digests, and the structure of the skeleton (expert counts, top-k, dropped
    sublayers, factors), so the final config is right. Returns the first layer to run."""
    from moekit.arch.discover import view_layer
    from moekit.arch.edit import drop_mlp, keep_experts, set_top_k
    from moekit.arch.factored import restore_factored

    done = work.finished_layers()
    for index in done:
        record = work.record(index)
        for pos, report in record["reports"].items():
            result.per_layer.setdefault(int(pos), {})[index] = report
        if record.get("mlp_dropped"):  # the skeleton as the finished layers left it
            drop_mlp(model, [index])
        if record.get("top_k") is not None and view_layer(model, index).top_k != record["top_k"]:
            set_top_k(model, {index: record["top_k"]})
        if record["experts"] is not None:
            keep_experts(model, {index: list(range(record["experts"]))})
        if record.get("factored"):  # after the counts: experts decompose factored (`moekit.arch.factored`)
            records = dict(getattr(model.config, FACTORED_KEY, None) or {})
            setattr(model.config, FACTORED_KEY, {**records, str(index): record["factored"]})
            restore_factored(model)
        for p, router in enumerate(record["routers"][: last + 1]):
            if router is not None:
                result.digests[p].routers.append(router)
        result.seconds = record["seconds"]
    return done[-1] + 1 if done else 0
