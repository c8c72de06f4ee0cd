"""The data configuration shared by training, evaluation and the demo (see `data_pipelines/`)."""

from __future__ import annotations

import ml_collections


def data_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            annotation_file="",  # the authors' annotation JSON
            image_root="",  # prefix for relative `vision3d` paths
            modality="auto",  # per file: .npy is "unit" (already in [0, 1]), NIfTI / CT DICOM "ct" (HU); or force "ct" | "mr" | "unit"
            volume_shape=(32, 256, 256),
            hu_window=(-1000.0, 1000.0),
            template="phi",
            max_length=768,  # llm_max_length
            question_max_length=64,  # BERT tokens of the TG-IS question
            tokenizer_path="",
            question_tokenizer_path="",
            num_vision_tokens=512,
            batch_size=2,  # per process
            seed=0,
            num_epochs=1,
            shuffle=True,
            augment=True,
            worker_count=0,
            read_threads=2,
            prefetch_buffer_size=2,
            strict=False,  # raise on bad input instead of a logged, counted skip
            max_skip_fraction=0.05,  # abort once more records than this were skipped
            drop_remainder=True,
        )
    )
