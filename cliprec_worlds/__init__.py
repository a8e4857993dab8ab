"""The worlds cliprec runs in, kept apart from the runtime package `cliprec`.

- `demo/`: the demo's catalog generator and its vocabulary tables (what `ingest` runs when
  `setup: demo`, through the `synthetic` source; dvc.yaml's ingest depends on `cliprec_worlds/${setup}`).
- `study/`: nothing to generate (the study reads Amazon Reviews 2023); the folder exists so that the
  study's ingest has a `cliprec_worlds/${setup}` to depend on.
- `demo_clip`: builds models/demo-clip (scripts/build_demo_clip.py); no stage imports it.
- `standins`: the study rehearsal's offline stand-ins (scripts/build_study_standins.py).

Nothing in `cliprec` imports this package, except `cliprec.catalog` for the `synthetic` source.
"""
