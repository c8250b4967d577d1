"""The accuracy options of the calibration search (issue 17) as command-line values: one
definition shared by `vsopt calibrate` and `vsopt bench` (its vsopt method). Light at import (no
torch): both commands' --help build parsers from it."""
from __future__ import annotations

# CalibrationOptions field -> the `vsopt calibrate` flag that sets it (errors name the flag)
FLAGS = {"pooled_remainder": "--pooled-remainder", "renorm_every": "--renorm-every",
         "residual_every": "--residual-every", "dense_warmup": "--dense-warmup", "mask_refresh": "--mask-refresh",
         "dynamic_top_k": "--top-k", "held_out_errors": "--held-out-errors", "clusters": "--clusters"}


def parse_list(text: str | None, option: str, kind=int) -> tuple:
    """'3,4' -> (3, 4) ('' or None: ()); a ConfigError naming `option` for a bad item."""
    from vsopt.core.errors import ConfigError

    try:
        return tuple(kind(v.strip()) for v in (text or "").split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected comma-separated {kind.__name__}s") from None


def search_fields(*, pooled: bool, renorm=(), residual=(), warmup=(), refresh=(), top_k=(),
                  dynamic_values=None, held_out: bool = False, error_weights=None, error_weights_probe=None,
                  clusters=()) -> dict:
    """The CalibrationOptions fields of the accuracy search from parsed values (checked by
    CalibrationOptions itself; rename its errors with flag_error)."""
    out = dict(pooled_remainder=bool(pooled), renorm_every=tuple(renorm), residual_every=tuple(residual),
               dense_warmup=tuple(warmup), mask_refresh=tuple(refresh), dynamic_top_k=tuple(top_k),
               held_out_errors=held_out, error_weights=error_weights,
               error_weights_probe=error_weights_probe, clusters=tuple(clusters))
    if dynamic_values is not None:
        out["dynamic_values"] = tuple(dynamic_values)
    return out


def flag_error(e: Exception, flags=FLAGS):
    """A CalibrationOptions error about one of `flags`' fields, as a ConfigError naming the flag
    (others unchanged)."""
    from vsopt.core.errors import ConfigError

    text = str(e)
    for field, flag in flags.items():
        if text.startswith(f"CalibrationOptions.{field}"):
            return ConfigError(flag + text[len(f"CalibrationOptions.{field}"):])
    return e
