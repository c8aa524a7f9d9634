"""Hooks of the ctxext RULER-style task files: the generated docs (workflow.ruler) and their score."""
import datasets

from workflow.ruler import metadata_family, score


def dataset(family: str, **metadata) -> dict:
    docs, _ = metadata_family(family, metadata)
    return {"test": datasets.Dataset.from_list(docs)}


def process_results(doc: dict, results: list[str]) -> dict:
    return {"score": score(doc["family"], results[0], doc["outputs"])}
