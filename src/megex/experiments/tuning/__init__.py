"""The tuning search behind every experiment's settings (`megex tune`): Optuna studies, the
same number of trials for every method, scored on validation images, then a confirmation
step on more seeds. See :mod:`.search`."""

from .search import SEARCH, run_search, search_space

__all__ = ["SEARCH", "run_search", "search_space"]
