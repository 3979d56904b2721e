"""Post-editing skl2onnx's HistGradientBoosting graph so it predicts what scikit-learn does.

skl2onnx 1.20 writes every HistGradientBoosting split as ``x ≤ float32(threshold)``. Two
things are then wrong, and :func:`fix_hist_gradient_boosting` mends both in the
``TreeEnsemble*`` node's attributes:

* **Thresholds** are rounded to the *nearest* float32; scikit-learn compares a float32 input
  with the float64 threshold, so the graph needs the largest float32 ``w ≤ t`` (diabetes
  regression showed 30 of 442 rows off by up to 14 without this).
* **Native categorical features** (``categorical_features=…``) are ignored altogether. With
  them, scikit-learn 1.9 puts an OrdinalEncoder in front of the trees (``_preprocessor``:
  categorical columns first, then the numeric ones), so the trees' feature indices refer to
  that reordered matrix, and a categorical split sends a row left when its category is in
  a bitset. Here feature indices are mapped back to the user's columns, and each
  categorical split becomes a chain of ``BRANCH_EQ`` nodes over the raw category values
  that share one "hit" child (the way onnxmltools writes LightGBM's categorical splits).
  Unknown categories and NaN follow the split's missing-value direction, as in
  scikit-learn: when missing values go left, the chain tests the categories that go right.

Categories must be numbers in the data (e.g. codes ``0 … k-1``); string categories would need
an encoder in the graph and are refused with a message.

Nodes are emitted tree by tree (iteration-major, then class) in ``model._predictors`` order,
node ids equal to the positions in each predictor's ``nodes`` array; that is checked.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .errors import ConversionError


def round_down_float32(thresholds: np.ndarray) -> np.ndarray:
    """Largest float32 ``w ≤ t`` per threshold: ``float32(x) ≤ t ⇔ float32(x) ≤ w``."""
    t = np.asarray(thresholds, dtype=np.float64)
    w = t.astype(np.float32)
    up = w.astype(np.float64) > t
    w[up] = np.nextafter(w[up], np.float32(-np.inf))
    return w


def _categories(model: Any) -> tuple[np.ndarray, list[np.ndarray]]:
    """(original column of each preprocessed column, raw categories per categorical column)."""
    n = int(model.n_features_in_)
    pre = getattr(model, "_preprocessor", None)
    flags = getattr(model, "is_categorical_", None)
    is_cat = np.zeros(n, bool) if flags is None else np.asarray(flags, bool)
    if pre is None or not is_cat.any():
        return np.arange(n), []
    order = np.concatenate([np.flatnonzero(is_cat), np.flatnonzero(~is_cat)])
    encoder = next(t for name, t, _ in pre.transformers_ if name == "encoder")
    cats = []
    for values in encoder.categories_:
        if np.asarray(values).dtype.kind not in "biuf":
            raise ConversionError(
                "HistGradientBoosting with string categories is not supported: encode the "
                "categorical columns as numbers (e.g. 0 … k-1) before fitting"
            )
        cats.append(np.asarray(values, dtype=np.float64))
    return order, cats


def _in_bitset(bitsets: np.ndarray, row: int, value: int) -> bool:
    return bool((int(bitsets[row, value // 32]) >> (value % 32)) & 1)


def fix_hist_gradient_boosting(onx: Any, model: Any) -> None:
    """Mend thresholds, feature indices and categorical splits in place (see module doc)."""
    import onnx

    node = next((n for n in onx.graph.node if n.op_type.startswith("TreeEnsemble")), None)
    if node is None:
        raise ConversionError("no TreeEnsemble node in the HistGradientBoosting graph")
    attrs = {a.name: a for a in node.attribute}
    get = onnx.helper.get_attribute_value
    arrays: dict[str, list[Any]] = {
        k: list(get(attrs[k]))
        for k in (
            "nodes_treeids", "nodes_nodeids", "nodes_featureids", "nodes_modes", "nodes_values",
            "nodes_truenodeids", "nodes_falsenodeids", "nodes_missing_value_tracks_true",
            "nodes_hitrates",
        )
        if k in attrs
    }  # fmt: skip
    order, cats = _categories(model)
    flat = [(t, tree) for t, tree in enumerate(tree for it in model._predictors for tree in it)]
    n_total = sum(len(tree.nodes) for _, tree in flat)
    if len(arrays["nodes_values"]) != n_total:
        raise ConversionError(
            f"HistGradientBoosting graph has {len(arrays['nodes_values'])} tree nodes, the model "
            f"{n_total} (onnx {onnx.__version__}); parity would not hold"
        )
    pos = 0
    added: dict[str, list[Any]] = {k: [] for k in arrays}
    out: dict[str, list[Any]] = {k: [] for k in arrays}
    for t, tree in flat:
        nodes = tree.nodes
        next_id = len(nodes)
        for i in range(len(nodes)):
            p = pos + i
            if arrays["nodes_nodeids"][p] != i or arrays["nodes_treeids"][p] != t:
                raise ConversionError("unexpected node order in the HistGradientBoosting graph")
            if nodes["is_leaf"][i]:
                arrays["nodes_values"][p] = 0.0
                continue
            feature = int(nodes["feature_idx"][i])
            arrays["nodes_featureids"][p] = int(order[feature])
            if not nodes["is_categorical"][i]:
                arrays["nodes_values"][p] = float(round_down_float32(nodes["num_threshold"][i]))
                continue
            next_id = _categorical_chain(
                arrays, added, p, t, nodes[i], cats[feature], tree.raw_left_cat_bitsets, next_id
            )
        # onnxruntime reads a tree's nodes as one run: chain nodes go right after their tree
        for key in arrays:
            out[key].extend(arrays[key][pos : pos + len(nodes)])
            out[key].extend(added[key])
            added[key].clear()
        pos += len(nodes)
    arrays = out
    kinds = {"nodes_modes": "strings", "nodes_values": "floats"}
    for key, values in arrays.items():
        attr = attrs[key]
        field = kinds.get(key, "floats" if key == "nodes_hitrates" else "ints")
        del getattr(attr, field)[:]
        if field == "strings":
            getattr(attr, field).extend(v if isinstance(v, bytes) else v.encode() for v in values)
        else:
            getattr(attr, field).extend(values)


def _categorical_chain(
    arrays: dict[str, list[Any]],
    added: dict[str, list[Any]],
    p: int,
    tree_id: int,
    node: Any,
    categories: np.ndarray,
    bitsets: np.ndarray,
    next_id: int,
) -> int:
    """Turn categorical split ``p`` into BRANCH_EQ nodes; returns the next free node id."""
    left, right = int(node["left"]), int(node["right"])
    goes_left = [_in_bitset(bitsets, int(node["bitset_idx"]), c) for c in range(len(categories))]
    if node["missing_go_to_left"]:  # test the categories that go right; the rest go left
        tested = [float(v) for v, gl in zip(categories, goes_left, strict=True) if not gl]
        hit, miss = right, left
    else:
        tested = [float(v) for v, gl in zip(categories, goes_left, strict=True) if gl]
        hit, miss = left, right
    values = np.asarray(tested or [np.nan], dtype=np.float32)  # NaN == NaN never holds
    ids = [int(arrays["nodes_nodeids"][p]), *range(next_id, next_id + len(values) - 1)]
    for k, value in enumerate(values):
        false_id = ids[k + 1] if k + 1 < len(ids) else miss
        row = {
            "nodes_modes": b"BRANCH_EQ",
            "nodes_values": float(value),
            "nodes_truenodeids": hit,
            "nodes_falsenodeids": false_id,
            "nodes_missing_value_tracks_true": 0,
        }
        if k == 0:
            for key, v in row.items():
                arrays[key][p] = v
            continue
        row.update(
            nodes_treeids=tree_id,
            nodes_nodeids=ids[k],
            nodes_featureids=arrays["nodes_featureids"][p],
            nodes_hitrates=1.0,
        )
        for key in added:
            added[key].append(row[key])
    return next_id + len(values) - 1
