"""Put a draft corpus (mlx_sbd/corpus.py: the model's own answers, where lookup drafts come from when the
conversation has nothing to copy) into an adapter folder, from training data files of the model's answers.

`mlx-sbd train --data self` writes one by itself; this is for answers made elsewhere, such as the built-in adapter's
(stage_data/smollm2-distill3 and smollm2-general4: the base's greedy answers to 5275 prompts of the train split, made
on these CPUs):

    python scripts/make_corpus.py --data stage_data/smollm2-distill3/train.jsonl.gz \
        --data stage_data/smollm2-general4/train.jsonl.gz --adapter mlx_sbd/adapters/smollm2-135m-instruct-sbd-gated

Use the answers of the model the adapter is for (the base's own greedy answers are what verified decoding outputs):
another model's text drafts worse, never wrongly (the causal rows check every draft).
"""

import time

import click

import mlx_sbd
from mlx_sbd.adapter import save_corpus
from mlx_sbd.corpus import MAX_NGRAM, Corpus, data_docs


@click.command()
@click.option("--data", "files", multiple=True, required=True, type=click.Path(exists=True, dir_okay=False),
              help="Training data file of the model's answers (.jsonl or .jsonl.gz, mlx_lm's formats); repeatable.")
@click.option("--adapter", required=True, type=click.Path(exists=True, file_okay=False), help="Adapter folder.")
@click.option("--model", default=None, help="Base model (its tokenizer). Default: the built-in SmolLM2-135M-Instruct.")
@click.option("--max-ngram", default=MAX_NGRAM, show_default=True, help="Longest context matched.")
def main(files, adapter, model, max_ngram):
    _, tokenizer = mlx_sbd.load(model, adapter_path=False)
    tic = time.perf_counter()
    corpus = Corpus.from_docs([doc for f in files for doc in data_docs(f, tokenizer)], max_ngram=max_ngram)
    save_corpus(adapter, corpus)
    click.echo(f"{len(corpus)} tokens in {corpus.docs} answers -> {adapter} ({time.perf_counter() - tic:.1f} s)")


if __name__ == "__main__":
    from mlx_sbd.backend import preload_openblas_and_reexec

    preload_openblas_and_reexec()
    main()
