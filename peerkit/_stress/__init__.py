"""Stress tools: a fuzz campaign and a soak run against a live broker (internal).

``python -m peerkit._stress.fuzz --inputs 100000`` (``nox -s fuzz``) sends mutated frames and
envelopes to a broker and checks after every batch that a well-behaved pair of peers still
publishes and queries; ``python -m peerkit._stress.soak --minutes 10`` (``nox -s soak``)
keeps steady traffic and peers joining and leaving, and watches for silent loss and memory
growth. Neither is part of the runtime nor of the default test run; the test suite runs a
short smoke of each.
"""
