"""Which registered fusions the engine runs (engine/fusions.py holds the registry).

One object per model, read at every step: changing it at run time switches paths on the same
loaded weights (a CUDA graph is captured per batch size and flag setting). Each registered
fusion is a boolean attribute of the same name::

    model.flags.o_proj_residual = False      # that step runs its unfused ops
    model.flags.set(down_proj_residual=False, add_rms_norm=True)   # several at once
    FusionFlags.none(), FusionFlags.default(), FusionFlags.parse("o_proj_residual,add_rms_norm")

Fusions that replace a common op are alternatives; turning one on while another is on is
refused with an error naming both.
"""

from __future__ import annotations

from collections.abc import Iterable

from engine import fusions as registry
from engine.program import Fusion


class FusionFlags:
    __slots__ = ("_enabled",)

    def __init__(self, enabled: Iterable[str] = ()):
        object.__setattr__(self, "_enabled", frozenset())
        self.set(**dict.fromkeys(enabled, True))

    # construction ---------------------------------------------------------------------------

    @classmethod
    def default(cls, exclude: Iterable[str] = ()) -> FusionFlags:
        """The engine's default: every fusion registered with ``default=True``, less
        ``exclude`` (a tensor-parallel model leaves out the fusions it has no span for; their
        replacements are defaults there and alternatives to them)."""
        skip = set(exclude)
        return cls(f.name for f in registry.all_fusions() if f.default and f.name not in skip)

    @classmethod
    def none(cls) -> FusionFlags:
        """Every step unfused."""
        return cls()

    @classmethod
    def parse(cls, spec: str) -> FusionFlags:
        """ "default", "none", a variant of one fusion f ("default-f": the default without f;
        "alt+f" / "alt-f", for f outside the default: the default without f's alternatives,
        with and without f), or comma-separated fusion names (e.g. from the command line)."""
        spec = spec.strip()
        if spec == "default":
            return cls.default()
        if spec in ("none", ""):
            return cls.none()
        for prefix in ("default-", "alt+", "alt-"):
            if spec.startswith(prefix):
                return cls._variant(prefix, registry.get(spec[len(prefix) :]))
        return cls(name.strip() for name in spec.split(",") if name.strip())

    @classmethod
    def _variant(cls, prefix: str, fusion: Fusion) -> FusionFlags:
        default = cls.default().enabled
        if prefix == "default-":
            if fusion.name not in default:
                raise ValueError(
                    f"default-{fusion.name}: {fusion.name} is not a default fusion "
                    f"(use alt+{fusion.name} or alt-{fusion.name})"
                )
            return cls(default - {fusion.name})
        if fusion.name in default:
            raise ValueError(
                f"{prefix}{fusion.name}: {fusion.name} is a default fusion (use default or "
                f"default-{fusion.name})"
            )
        base = without_alternatives(default, fusion)
        return cls(base | {fusion.name} if prefix == "alt+" else base)

    @classmethod
    def from_arg(cls, flags: FusionFlags | str | None) -> FusionFlags | None:
        """A ``flags`` argument of engine.build: None or "default" -> None (the model then
        takes its own default, the defaults that apply to its program), another string ->
        parse, FusionFlags -> itself."""
        if isinstance(flags, str):
            return None if flags.strip() == "default" else cls.parse(flags)
        return flags

    def copy(self) -> FusionFlags:
        return FusionFlags(self._enabled)

    # access ---------------------------------------------------------------------------------

    @property
    def enabled(self) -> frozenset[str]:
        return self._enabled

    def fusions(self) -> list[Fusion]:
        """The enabled fusions, in registry order."""
        return [f for f in registry.all_fusions() if f.name in self._enabled]

    def key(self) -> tuple[str, ...]:
        """Hashable snapshot: CUDA graphs and programs are cached per flag setting."""
        return tuple(sorted(self._enabled))

    def __getattr__(self, name: str) -> bool:
        if name.startswith("_"):
            raise AttributeError(name)
        registry.get(name)  # unknown name: an error listing the registered ones
        return name in self._enabled

    def __setattr__(self, name: str, value: bool) -> None:
        self.set(**{name: value})

    def set(self, **changes: bool) -> FusionFlags:
        """Apply several changes at once (so that one alternative can replace another)."""
        enabled = set(self._enabled)
        for name, value in changes.items():
            registry.get(name)
            if not isinstance(value, bool):
                raise TypeError(f"flag {name} must be True or False, got {value!r}")
            (enabled.add if value else enabled.discard)(name)
        check_compatible(enabled)
        object.__setattr__(self, "_enabled", frozenset(enabled))
        return self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FusionFlags) and other._enabled == self._enabled

    def __hash__(self) -> int:
        return hash(self._enabled)

    def __repr__(self) -> str:
        return f"FusionFlags({', '.join(self.key()) or 'none'})"


def without_alternatives(names: Iterable[str], fusion: Fusion) -> frozenset[str]:
    """``names`` less every alternative of ``fusion``: the base of its alt+f / alt-f variants."""
    return frozenset(n for n in names if not registry.get(n).conflicts_with(fusion))


def check_compatible(names: Iterable[str]) -> None:
    """Refuse a set of fusions that holds two alternatives (naming them and the shared op)."""
    chosen = [registry.get(name) for name in sorted(names)]
    for i, a in enumerate(chosen):
        for b in chosen[i + 1 :]:
            if a.conflicts_with(b):
                shared = ", ".join(sorted(a.ops & b.ops))
                raise ValueError(
                    f"fusions {a.name} and {b.name} are alternatives (both replace {shared}): "
                    f"switch one off to use the other"
                )
