"""Routing analysis: what the routers of an MoE model do, as numbers and figures.

`analyze` streams the model one decoder layer at a time and measures, per MoE layer and
expert, load, co-activation, cross-layer predictability, token-id and position
specialisation, domain specificity and (with a focus corpus) loss attribution;
`moekit.analyze.report.write` turns one or two analyses into ``report.html``, one PNG per
figure and ``analysis.json``.

``moekit.analyze`` is both this package and the public function: importing a submodule
(``moekit.analyze.report``) makes Python bind the package to that name on ``moekit``, so
the package itself is callable and calls `analyze`.
"""

import sys
import types

from moekit.analyze.run import Analysis, analyze

__all__ = ["Analysis", "analyze"]


class _CallablePackage(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return analyze(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
