"""Block-mask helpers: mask -> table conversion, pooled block scores, dynamic top-k / mass masks."""
