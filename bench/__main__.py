"""``python -m bench``: run the benchmark (``bench/run.py``); ``python -m bench scale``: the
scale run (``bench/scale.py``); ``roundtrips``: single statements (``bench/roundtrips.py``);
``interleaved``: two systems' enqueue-to-result, sample by sample (``bench/interleaved.py``);
``killstorm``, ``latency`` and ``timeouts``: the modules named in ``bench/sidebyside.py``."""

import sys

if sys.argv[1:2] == ["scale"]:
    from bench.scale import main

    raise SystemExit(main(sys.argv[2:]))

if sys.argv[1:2] == ["interleaved"]:
    from bench.interleaved import main as interleaved

    raise SystemExit(interleaved(sys.argv[2:]))

if sys.argv[1:2] == ["roundtrips"]:
    from bench.roundtrips import main as roundtrips

    raise SystemExit(roundtrips(sys.argv[2:]))

if sys.argv[1:2] in (["killstorm"], ["latency"], ["timeouts"]):  # see COMMANDS there
    from bench.sidebyside import run_command

    raise SystemExit(run_command(sys.argv[1], sys.argv[2:]))

from bench.run import main

raise SystemExit(main())
