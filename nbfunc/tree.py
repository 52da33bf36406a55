"""`Params` as a pytree: flatten to tensor leaves, rebuild without validation, stack ensembles.

Every `nbfunc.params.Node` class flattens to its ``LEAVES`` tensors followed by its
``CHILDREN`` sub-trees; all other fields form the static context. Rebuilding uses
``model_construct``, which skips validation, so leaves may be anything torch.func hands back
(batched tensors, Jacobian blocks, nested trees for a Hessian).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

from nbfunc.params import Beam, Crystal, Detector, Node, Params, SourceGrid, SourceList, _same


class StaticSettings(tuple):
    """A node's static fields as (name, value) pairs, compared by value: tensors (the mask,
    the mosaic draws, the source fractions) by their entries, so that trees built apart with
    the same settings have equal tree structures (`stack`, the caches of derived functions).
    The hash is that of the names (equal settings hash alike)."""

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, tuple) and len(self) == len(other)
                and all(n == m and _same(a, b) for (n, a), (m, b) in zip(self, other)))

    def __ne__(self, other: object) -> bool:
        return not self == other

    def __hash__(self) -> int:
        return hash(tuple(name for name, _ in self))


def _flatten(node: Node):
    cls = type(node)
    names = cls.LEAVES + cls.CHILDREN
    children = [getattr(node, name) for name in names]
    static = StaticSettings((name, getattr(node, name)) for name in cls.static_fields())
    return children, (cls, names, static)


def _unflatten(children, context):
    cls, names, static = context
    values = dict(static)
    values.update(zip(names, children))
    node = object.__new__(cls)
    object.__setattr__(node, "__dict__", values)
    object.__setattr__(node, "__pydantic_fields_set__", set(values))
    object.__setattr__(node, "__pydantic_extra__", None)
    object.__setattr__(node, "__pydantic_private__", None)
    return node


def _flatten_with_keys(node: Node):
    children, context = _flatten(node)
    keys = [pytree.GetAttrKey(name) for name in context[1]]
    return list(zip(keys, children)), context


_NODES = (Params, Beam, Detector, Crystal, SourceGrid, SourceList)
"""The parameter-tree classes registered as pytree nodes."""

for _cls in _NODES:
    pytree.register_pytree_node(
        _cls, _flatten, _unflatten,
        serialized_type_name=f"nbfunc.{_cls.__name__}",
        flatten_with_keys_fn=_flatten_with_keys,
    )


def _spec_paths(spec: pytree.TreeSpec, prefix: str, out: list[str]) -> bool:
    """Append the dotted leaf names of ``spec`` to ``out``; False when the tree holds a
    container other than the nbfunc nodes."""
    if spec.is_leaf():
        out.append(prefix)
        return True
    if spec.type not in _NODES:
        return False
    return all(_spec_paths(child, f"{prefix}.{name}" if prefix else name, out)
               for name, child in zip(spec.context[1], spec.children()))


def _paths_from_spec(tree: Node, spec: pytree.TreeSpec) -> list[str]:
    out: list[str] = []
    if _spec_paths(spec, "", out):
        return out
    pairs, _ = pytree.tree_flatten_with_path(tree)
    return [".".join(k.name for k in path) for path, _ in pairs]


def leaf_paths(tree: Node) -> list[str]:
    """Dotted names of the tensor leaves of ``tree`` in flattening order.

    >>> leaf_paths(p)[:3]            # doctest: +SKIP
    ['beam.wavelength', 'beam.kahn_factor', 'beam.fluence']
    """
    return _paths_from_spec(tree, pytree.tree_flatten(tree)[1])


def tree_map_leaves(fn: Callable[[torch.Tensor], Any], tree: Node) -> Any:
    """Apply ``fn`` to every leaf and rebuild the tree (no validation)."""
    return pytree.tree_map(fn, tree)


def get_leaf(tree: Node, path: str) -> Any:
    """The leaf at dotted ``path`` (e.g. ``"crystal.cell_a"``)."""
    node: Any = tree
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _unknown_leaves(tree: Node, unknown: list, paths: list[str]) -> str:
    """One line naming (up to three of) ``unknown`` and the leaf names nearest the first, or
    saying that it is a static setting."""
    import difflib

    parent, _, field = str(unknown[0]).rpartition(".")
    try:
        node = get_leaf(tree, parent) if parent else tree
    except AttributeError:
        node = None
    if isinstance(node, Node) and field in type(node).static_fields():
        return (f"{unknown[0]!r} is a static setting, not a tensor leaf; build a new tree to "
                "change it (e.g. Params(**{...}) or .model_copy(update=...))")
    shown = ", ".join(repr(str(name)[:60]) for name in unknown[:3])
    more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
    near = difflib.get_close_matches(str(unknown[0]), paths, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(map(repr, near))}? " if near else ""
    return (f"not leaves of this tree: {shown}{more}; {hint}nbfunc.leaf_paths(tree) lists its "
            f"{len(paths)} leaves")


def replace_leaves(tree: Node, updates: dict[str, Any]) -> Any:
    """A copy of ``tree`` with the leaves named by dotted paths replaced (no validation).

    Raises:
        KeyError: a path that is not a leaf, with the nearest leaf names (`leaf_paths` lists
            them all).
    """
    leaves, spec = pytree.tree_flatten(tree)
    paths = _paths_from_spec(tree, spec)
    unknown = sorted(set(updates) - set(paths), key=str)
    if unknown:
        raise KeyError(_unknown_leaves(tree, unknown, paths))
    index = {p: i for i, p in enumerate(paths)}
    for path, value in updates.items():
        leaves[index[path]] = value
    return pytree.tree_unflatten(leaves, spec)


def stack(trees: Sequence[Node]) -> Any:
    """Stack trees of identical structure into one whose leaves gain a leading batch axis.

    The result is meant for ``torch.func.vmap``: ``vmap(simulate)(stack([p1, p2]))``.

    Raises:
        ValueError: when the trees differ in a static setting or in leaf shapes.
    """
    if not trees:
        raise ValueError("stack needs at least one tree")
    flat = [pytree.tree_flatten(t) for t in trees]
    spec0 = flat[0][1]
    for i, (leaves, spec) in enumerate(flat[1:], start=1):
        if spec != spec0:
            raise ValueError(f"tree {i} differs from tree 0 in its static settings or structure; "
                             "only leaves may differ between ensemble members")
    columns = list(zip(*(leaves for leaves, _ in flat)))
    paths = leaf_paths(trees[0])
    stacked = []
    for path, column in zip(paths, columns):
        shapes = {tuple(c.shape) for c in column}
        if len(shapes) != 1:
            raise ValueError(f"leaf {path} has different shapes across trees: {sorted(shapes)}")
        stacked.append(torch.stack(list(column)))
    return pytree.tree_unflatten(stacked, spec0)


def unstack(tree: Node) -> list[Any]:
    """Inverse of `stack`: split the leading batch axis of every leaf."""
    leaves, spec = pytree.tree_flatten(tree)
    n = leaves[0].shape[0]
    return [pytree.tree_unflatten([leaf[i] for leaf in leaves], spec) for i in range(n)]
