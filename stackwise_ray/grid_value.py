"""GridValue: a swept key's value at a trial's grid point, as a Ray Tune search Domain.

A sweep's grid is one Tune grid over the index of its grid points (tune.grid_variants:
arms x learning rates x seeds, and the baseline), and every swept key is resolved from
that index. A Domain of its own rather than a `tune.sample_from` function: Tune's trial
table shows Domains as columns and hides functions, so the table reads
`building_mode  lr  seed` instead of an index.
"""

from __future__ import annotations

from ray.tune.search.sample import BaseSampler, Domain


class GridValue(Domain):
    """The value of `key` in the grid point `variants[config["variant"]]` (`default` where
    that point does not set it)."""

    class _Pick(BaseSampler):
        def sample(self, domain, config=None, size=1, random_state=None):
            try:
                index = config["variant"]
            except KeyError:  # Tune passes the whole spec where the space sits under "config"
                index = config["config"]["variant"]
            value = domain.variants[index].get(domain.key, domain.default)
            return [value] * size if size > 1 else value

    default_sampler_cls = _Pick

    def __init__(self, variants: list[dict], key: str, default):
        self.variants, self.key, self.default = variants, key, default

    def is_valid(self, value) -> bool:
        return any(v.get(self.key, self.default) == value for v in self.variants)

    def domain_str(self) -> str:
        return f"the {self.key} of the trial's grid point"
