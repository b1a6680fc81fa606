"""The harness behind ``benchmarks/peers/data_free.py``: our data-free attacks beside public
implementations of DFME, DisGUIDE and dual students, on one victim (that script's docstring
says what runs).

- ``metering``: counting the peers' queries, refusing past the budget, evaluating at marks;
- ``peer_imports``: importing a peer's code from its folder, with stand-ins for the packages
  it never uses;
- ``mebench_peer``, ``authors_peer``, ``dual_students_peer``, ``ours``: one run of each
  implementation;
- ``rows``, ``run_rows``, ``table``: the rows of the plan, running each once, the table;
- ``cli``: the command line.
"""
