"""The installed package maps models/ and cpu_ops/ under neo_jax and builds the extension."""

import importlib.metadata

import neo_jax.cpu_ops
import neo_jax.models


def test_subpackages_are_mapped_under_neo_jax() -> None:
    assert neo_jax.models.__name__ == "neo_jax.models"
    assert neo_jax.cpu_ops.__name__ == "neo_jax.cpu_ops"


def test_no_bare_top_level_package_lands_in_site_packages() -> None:
    installed = importlib.metadata.files("neo-jax") or []
    top_levels = {path.parts[0] for path in installed}
    assert not top_levels & {"models", "cpu_ops", "kernels"}, sorted(top_levels)


def test_extension_reports_an_instruction_set() -> None:
    assert neo_jax.cpu_ops.cpu_isa() in {"scalar", "avx2", "avx512", "avx512_bf16"}
