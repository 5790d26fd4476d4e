"""Benchmarks, printed as tables (`python -m cidm bench ...`), one module each:

- `core`: CIDM's core claims on a concept set (learning time, IA against the base, EWA routing and its cost);
- `compose`: concept neglect in boxes and the cost of regions;
- `methods`: every method on one protocol (IA / TA after every task, forgetting), training groups in processes;
- `tuning`: each method's weight chosen on the tuning sequence;
- `results`: what they share: the concept set, the protocol, timing, results files and tables.

Concept sets use the `examples/concepts` format (concepts.json + images), so the same commands run on real photos
with SD-1.5 on a GPU.
"""
