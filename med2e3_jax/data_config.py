"""The data configuration shared by training, evaluation and the demo (see `data_pipelines/`)."""

from __future__ import annotations

import ml_collections


def data_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            annotation_file="",  # the authors' annotation JSON
            image_root="",  # prefix for relative `vision3d` paths; every record's volume must resolve inside it
            allow_outside_root=False,  # also read volumes outside image_root (`..`, absolute paths, symlinks out)
            modality="auto",  # per file: .npy is "unit" (already in [0, 1]), NIfTI / CT DICOM "ct" (HU); or force "ct" | "mr" | "unit"
            volume_shape=(32, 256, 256),
            hu_window=(-1000.0, 1000.0),
            # What one volume file may ask for (data_pipelines.readers.VolumeLimits), checked on its header
            # before anything of that size is allocated; a file beyond them is a counted skip.
            max_voxels=1024 * 1024 * 2048,
            max_header_bytes=1 << 24,  # NIfTI header with its extensions, .npy header
            min_extent=8,  # voxels along every axis: fewer is a slice or an RGB image, not a volume
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
            max_skip_fraction=0.05,  # abort once more were skipped: judged every batch and at the end of the run
            drop_remainder=True,
        )
    )
