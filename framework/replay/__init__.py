"""`mode=replay`: a serving benchmark. Requests arrive from a distribution or a trace, run through
an in-process engine (one, or a simulated cluster of several) or an OpenAI-compatible server, and
each run reports latency percentiles, throughput and goodput under an SLO (docs/serving-benchmark.md).

    traces.py      the Azure CSV and Mooncake JSONL readers
    arrivals.py    arrival times and length distributions
    workload.py    the requests of a run: arrival, prompt token ids, output length
    driver.py      one discrete-event loop over engines on wall or virtual clocks
    http_client.py the same workload against a URL, timed by stream chunks
    statistics.py  per-request timings -> the run's statistics
    report.py      the JSON document and the table
    figures.py     latency CDFs of a run; a sweep's runs side by side
    sweep.py       after a Hydra multirun: the sweep figure from its runs' JSON
"""
