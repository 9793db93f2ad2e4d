"""Write the API reference pages from the modules' ``__all__`` and check every public docstring.

Run by ``docs/conf.py`` before Sphinx reads the sources: one page per public module of
``clusterlearn`` and of ``clusterlearn.adapters`` (both found on disk) and one page per public
name, so the reference follows the code without a hand-kept list. A name re-exported from
another public module (``clusterlearn.odc.OnlineDeepClustering`` is the object
``clusterlearn.OnlineDeepClustering``) is documented once, under its first public home, and
linked from the others.

:func:`missing_docstrings` lists every public name (and every public method or property of a
public class) without a docstring, :func:`prose_in_entries` every paragraph that numpydoc
would render as a parameter; ``conf.py`` turns each into a build warning, which ``make
docs`` (``sphinx -W``) makes an error, and ``tests/docs/test_snippets.py`` runs it as a test.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
import types
import typing
from pathlib import Path

def _public_submodules(package: types.ModuleType) -> list[str]:
    """The package's submodules whose names do not start with ``_``, sorted."""
    return sorted(
        f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")
    )


def public_modules() -> list[str]:
    """The public modules, in reference order: the package, its public submodules, the adapters.

    Found on disk, not listed by hand: a new public module (or adapter) gets its pages.
    """
    import clusterlearn
    import clusterlearn.adapters

    core = [m for m in _public_submodules(clusterlearn) if m != "clusterlearn.adapters"]
    return ["clusterlearn", *core, *_public_submodules(clusterlearn.adapters)]


def public_names(module: types.ModuleType) -> list[str]:
    """``module.__all__``, or the public names the module defines itself when it has none."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            n
            for n, obj in vars(module).items()
            if not n.startswith("_")
            and getattr(obj, "__module__", None) == module.__name__
            and (inspect.isclass(obj) or inspect.isfunction(obj))
        ]
    return sorted(names, key=lambda n: (not inspect.isclass(getattr(module, n)), n.lower()))


def _kind(obj: object) -> str:
    """``module``, ``class``, ``exception``, ``function`` or ``data`` (constants, type aliases)."""
    if inspect.ismodule(obj):
        return "module"
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if typing.get_origin(obj) is not None:  # a type alias (Callable[[Array], Array]): its #: comment
        return "data"
    if callable(obj):
        return "function"
    return "data"


def _public_members(cls: type) -> list[tuple[str, object]]:
    """The public methods, properties and class-/static methods a class defines itself."""
    out = []
    for name, value in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(value, (property, staticmethod, classmethod)) or inspect.isfunction(value):
            out.append((name, getattr(cls, name)))
    return out


def _overrides_framework(cls: type, name: str) -> bool:
    """Whether ``name`` overrides a method of a base class from outside clusterlearn (``forward``)."""
    return any(
        name in vars(base) and not base.__module__.startswith("clusterlearn")
        for base in cls.__mro__[1:]
    )


def _own_doc(value: object) -> str:
    if isinstance(value, property) and not value.__doc__:
        value = value.fget
    return (getattr(value, "__doc__", None) or "").strip()


def data_doc(modname: str, name: str) -> str:
    """The ``#:`` comment lines right above ``name = ...`` in the module's source, or ``""``.

    The same convention autodoc reads for module-level constants; parsed here without Sphinx so
    that the test suite can run the check.
    """
    try:
        source = inspect.getsource(importlib.import_module(modname))
    except (OSError, TypeError):
        return ""
    lines = source.splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"{re.escape(name)}\s*(:[^=]*)?=", line):
            doc = []
            for above in reversed(lines[:i]):
                if not above.startswith("#:"):
                    break
                doc.insert(0, above[2:].strip())
            if doc:
                return "\n".join(doc)
    return ""


def missing_docstrings() -> list[str]:
    """Every public name of the documented modules that has no docstring of its own."""
    missing = []
    for modname in public_modules():
        module = importlib.import_module(modname)
        if not (module.__doc__ or "").strip():
            missing.append(modname)
        for name in public_names(module):
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                continue
            if _kind(obj) == "data":
                documented = bool(data_doc(_defining_module(module, name), name))
            else:
                documented = bool(_own_doc(obj))
            if not documented:
                missing.append(f"{modname}.{name}")
            if inspect.isclass(obj):
                public = {member for member, _ in _public_members(obj)}
                for member, value in vars(obj).items():
                    if member in public and not _own_doc(value) and not _overrides_framework(obj, member):
                        missing.append(f"{modname}.{name}.{member}")
    return missing


_ENTRY = re.compile(r"\*{0,2}[A-Za-z_][A-Za-z0-9_]*")
_LISTS = ("Parameters", "Other Parameters", "Attributes")


def swallowed_paragraph(doc: str) -> str | None:
    """The first line of a paragraph that numpydoc would read as a parameter, or ``None``.

    numpydoc reads every unindented line of a ``Parameters`` (``Other Parameters``,
    ``Attributes``) section, up to the next section header, as an entry ``name : type``; a
    paragraph written after the entries without a ``Notes`` header renders as a bogus
    parameter named after its first line. Parsed here without numpydoc so that the test
    suite can run the check.
    """
    lines = doc.splitlines()
    section = None
    for i, line in enumerate(lines):
        nxt = lines[i + 1] if i + 1 < len(lines) else ""
        if line.strip() and re.fullmatch(r"-{3,}", nxt.strip()) and not line.startswith(" "):
            section = line.strip()
            continue
        if section not in _LISTS or not line.strip() or line.startswith(" ") or re.fullmatch(r"-{3,}", line.strip()):
            continue
        names = [n.strip() for n in line.split(" : ")[0].split(",") if n.strip()]
        if not all(_ENTRY.fullmatch(n) for n in names):
            return line.strip()
    return None


def prose_in_entries() -> list[str]:
    """``"name: first line"`` for every public name or member whose docstring has a
    :func:`swallowed_paragraph`."""
    found, seen = [], set()

    def check(name: str, obj: object) -> None:
        doc = inspect.getdoc(obj.fget if isinstance(obj, property) else obj)
        if not doc or id(obj) in seen:
            return
        seen.add(id(obj))
        line = swallowed_paragraph(doc)
        if line is not None:
            found.append(f"{name}: {line[:60]}")

    for modname in public_modules():
        module = importlib.import_module(modname)
        for name in public_names(module):
            obj = getattr(module, name)
            if inspect.ismodule(obj) or _kind(obj) == "data":
                continue
            check(f"{modname}.{name}", obj)
            if inspect.isclass(obj):
                for member, value in _public_members(obj):
                    check(f"{modname}.{name}.{member}", value)
    return found


def _title(text: str, char: str = "=") -> str:
    return f"{text}\n{char * len(text)}\n"


def _defining_module(module: types.ModuleType, name: str) -> str:
    """The module whose source assigns the constant ``name`` (a re-export names its origin)."""
    for modname in (module.__name__, *public_modules()):
        if data_doc(modname, name):
            return modname
    return module.__name__


def _summary(modname: str, name: str, obj: object) -> str:
    """The first paragraph of the docstring (of the ``#:`` comment for a constant), one line."""
    if _kind(obj) == "data":
        doc = data_doc(_defining_module(importlib.import_module(modname), name), name)
    else:
        doc = inspect.getdoc(obj) or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def write_pages(outdir: Path) -> list[str]:
    """Write ``outdir/index.rst``, one page per module and one per name; return the module pages."""
    outdir.mkdir(parents=True, exist_ok=True)
    for old in outdir.glob("*.rst"):
        old.unlink()
    home: dict[int, str] = {}  # id(object) -> the qualified name it is documented under
    written = []
    for modname in public_modules():
        module = importlib.import_module(modname)
        own, elsewhere = [], []
        for name in public_names(module):
            obj = getattr(module, name)
            if inspect.ismodule(obj):
                elsewhere.append((name, obj.__name__, "mod"))
            elif id(obj) in home and _kind(obj) != "data":
                elsewhere.append((name, home[id(obj)], "obj"))
            else:
                home.setdefault(id(obj), f"{modname}.{name}")
                RESOLVER.index({f"{modname}.{name}": obj})
                if inspect.isclass(obj):
                    RESOLVER.index({f"{modname}.{name}.{m}": v for m, v in _public_members(obj)})
                own.append(name)
                _write_object_page(outdir, modname, name, obj)
        lines = [_title(f"``{modname}``"), f".. automodule:: {modname}\n   :no-members:\n"]
        if own:
            lines += [f".. currentmodule:: {modname}\n", ".. list-table::\n   :widths: 30 70\n"]
            for n in own:
                lines += [f"   * - :py:obj:`{n}`", f"     - {_summary(modname, n, getattr(module, n))}"]
            lines += [
                "",
                ".. toctree::\n   :hidden:\n",
                *[f"   {modname}.{n}" for n in own],
                "",
            ]
        if elsewhere:
            lines.append("Also importable from here, documented under their first public home:\n")
            lines += [f"- ``{n}``: :py:{role}:`{target}`" for n, target, role in elsewhere]
            lines.append("")
        RESOLVER.index({modname: module})
        (outdir / f"{modname}.rst").write_text("\n".join(lines))
        written.append(modname)
    index = [
        _title("API reference"),
        "Every public name of ``clusterlearn`` and ``clusterlearn.adapters.*``, generated from the",
        "modules' ``__all__`` and the numpydoc docstrings. The top-level package re-exports the",
        "core's main classes and functions; the submodules add the pure-function and helper layers.",
        "",
        ".. list-table::\n   :widths: 35 65\n",
        *[line for m in written for line in (f"   * - :py:mod:`{m}`", f"     - {_module_summary(m)}")],
        "",
        ".. toctree::\n   :hidden:\n",
        *[f"   {m}" for m in written],
        "",
    ]
    (outdir / "index.rst").write_text("\n".join(index))
    return written


def _module_summary(modname: str) -> str:
    """The first paragraph of a module's docstring, one line."""
    return " ".join((importlib.import_module(modname).__doc__ or "").strip().split("\n\n")[0].split())


def _write_object_page(outdir: Path, modname: str, name: str, obj: object) -> None:
    kind = _kind(obj)
    body = [_title(f"{modname}.{name}"), f".. currentmodule:: {modname}\n"]
    if kind in ("class", "exception"):
        body.append(f".. auto{kind}:: {name}\n   :members:\n")
    elif kind == "function":
        body.append(f".. autofunction:: {name}\n")
    else:
        body.append(f".. autodata:: {name}\n")
    (outdir / f"{modname}.{name}.rst").write_text("\n".join(body))


_NOTHING = object()


def _lookup(path: str) -> object:
    """The object a dotted ``path`` names (a module, then attributes), or ``_NOTHING``."""
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        modname = ".".join(parts[:cut])
        try:
            obj: object = importlib.import_module(modname)
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return _NOTHING
        return obj
    return _NOTHING


class Resolver:
    """Resolve a cross-reference written relative to where an object is defined.

    A docstring written in ``clusterlearn/odc.py`` says ``:meth:`OnlineDeepClustering.step```;
    the page documents the class as ``clusterlearn.OnlineDeepClustering``. The resolver finds the
    object the text names (from the reference's module and class context, then in any loaded
    ``clusterlearn`` module) and links to the name it is documented under. A name that names no
    object stays unresolved, so ``nitpicky`` still reports it; an existing object that is not
    public (a private helper, a framework class) is shown as code without a link.
    """

    def __init__(self) -> None:
        self.home: dict[int, str] = {}

    def index(self, documented: dict[str, object]) -> None:
        """Record the documented objects: ``{qualified name: object}``."""
        for name, obj in documented.items():
            self.home.setdefault(id(obj), name)

    def candidates(self, target: str, module: str | None, cls: str | None) -> list[str]:
        target = target.lstrip("~.")
        out = []
        if module and cls:
            out.append(f"{module}.{cls}.{target}")
        if module:
            out.append(f"{module}.{target}")
        out.append(target)
        import sys

        out += [f"{m}.{target}" for m in sorted(sys.modules) if m.startswith("clusterlearn")]
        return out

    def resolve(self, target: str, module: str | None, cls: str | None) -> tuple[str | None, bool]:
        """``(documented name or None, whether the target names an existing object)``."""
        for path in self.candidates(target, module, cls):
            obj = _lookup(path)
            if obj is _NOTHING:
                continue
            if id(obj) in self.home:
                return self.home[id(obj)], True
            head, _, attr = path.rpartition(".")
            owner = _lookup(head) if head else _NOTHING
            if owner is not _NOTHING and id(owner) in self.home:
                return f"{self.home[id(owner)]}.{attr}", True
            return None, True
        return None, False


RESOLVER = Resolver()
