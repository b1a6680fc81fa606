"""The experiments: each measures one question under the fair protocol (DESIGN.md, "How
results are measured") and is run by one `megex` command.

- :mod:`.query_efficiency` (`megex bench`): explanation attacks against predictions-only
  ones, queries to reach each fraction of the victim, paired intervals.
- :mod:`.tuning` (`megex tune`): the search behind every method's settings.
- :mod:`.tradeoff` (`megex tradeoff`): what each defence costs honest users and takes from
  the attacker.
- :mod:`.detection` (`megex detection`): whether query monitors flag the attacks.
- :mod:`.input_size` (`megex input-size`): the benchmark at several input sizes.
- :mod:`.gradient_alignment` (`megex gradient-alignment`): how well DFME's zeroth-order
  gradient aligns with the exact one.
- :mod:`.utility` (`megex utility`): what a defence leaves of an explanation's value.

They share one kit: :mod:`.common` (configs, tables, outputs), :mod:`.methods` (the methods
and their tuned settings), :mod:`.runner` (one run, resumable) and :mod:`.sweep` (local
processes or Ray tasks). An experiment plans jobs, sweeps them, summarises the finished
runs into one JSON-able dict, and writes that dict as JSON, markdown and plots. Only
:mod:`megex.cli` parses arguments; experiments take the parsed options as attributes.
"""
