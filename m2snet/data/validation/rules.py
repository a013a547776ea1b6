"""The rules a dataset must meet, as great-expectations expectations on the per-case facts, each with a
sentence; and their run in an ephemeral GX context, mapped back to the offending cases."""

from __future__ import annotations

import logging
from typing import Any

from m2snet.data.format import DatasetInfo
from m2snet.data.validation.report import ExpectationOutcome

MIN_SIZE, MAX_SIZE = 32, 8192


def _quiet_great_expectations() -> None:
    """Called before GX is first imported: GX logs its own start-up at INFO (hundreds of lines); only its
    warnings matter to our users. (GX is imported inside the functions that use it: it is heavy, and only
    validation needs it, never a training run.)"""
    logging.getLogger("great_expectations").setLevel(logging.WARNING)


def dataset_rules(
    info: DatasetInfo, allow_duplicates: bool, allow_label_conflicts: bool, check_groups: bool,
    min_size: int, max_size: int,
) -> list[tuple[Any, str]]:
    """The rules, as GX expectations with a sentence each."""
    _quiet_great_expectations()
    import great_expectations.expectations as gxe

    true = [True]
    rules: list[tuple[Any, str]] = [
        (gxe.ExpectTableRowCountToBeBetween(min_value=1), "the dataset has at least one case"),
        (gxe.ExpectColumnValuesToBeInSet(column="image_decodes", value_set=true), "every image decodes"),
        (gxe.ExpectColumnValuesToBeInSet(column="image_is_rgb", value_set=true), "images are 8-bit RGB"),
        (gxe.ExpectColumnValuesToBeInSet(column="mask_decodes", value_set=true), "every mask decodes"),
        (gxe.ExpectColumnValuesToBeInSet(column="mask_is_grey", value_set=true), "masks are 8-bit grey (L)"),
        (gxe.ExpectColumnValuesToBeInSet(column="mask_size_matches", value_set=true),
         "each mask has its image's size"),
        (gxe.ExpectColumnValuesToBeInSet(column="manifest_size_matches", value_set=true),
         "sizes agree with manifest.csv"),
        (
            gxe.ExpectColumnValuesToBeInSet(column="mask_values_valid", value_set=true),
            "masks are binary (0/1)" if info.is_binary else f"mask values are class ids 0..{info.n_classes - 1}",
        ),
        (gxe.ExpectColumnValuesToBeInSet(column="sha256_matches", value_set=true),
         "image bytes match the manifest sha256"),
        (gxe.ExpectColumnValuesToBeInSet(column="mask_sha256_matches", value_set=true),
         "mask bytes match the manifest mask_sha256"),
        (gxe.ExpectColumnValuesToBeInSet(column="lesion_area_matches", value_set=true),
         "lesion area (mask pixels > 0) matches the manifest lesion_area"),
        (gxe.ExpectColumnValuesToBeBetween(column="height", min_value=min_size, max_value=max_size),
         f"height within {min_size}..{max_size} px"),
        (gxe.ExpectColumnValuesToBeBetween(column="width", min_value=min_size, max_value=max_size),
         f"width within {min_size}..{max_size} px"),
    ]
    if info.labels:
        rules.append((gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(info.labels)),
                      f"labels are among {info.labels}"))
    for label in info.meta.get("lesion_labels", []):
        rules.append((
            gxe.ExpectColumnValuesToBeBetween(
                column="lesion_area", min_value=1, row_condition=f'label=="{label}"', condition_parser="pandas",
            ),
            f"'{label}' cases have a lesion",
        ))
    for label in info.meta.get("empty_labels", []):
        rules.append((
            gxe.ExpectColumnValuesToBeBetween(
                column="lesion_area", min_value=0, max_value=0, row_condition=f'label=="{label}"',
                condition_parser="pandas",
            ),
            f"'{label}' cases have an empty mask",
        ))
    if not allow_duplicates:
        rules.append((gxe.ExpectColumnValuesToBeUnique(column="sha256"), "no two cases have the same image bytes"))
    if not allow_label_conflicts:
        rules.append((
            gxe.ExpectColumnValuesToBeInSet(column="label_conflict", value_set=[False]),
            "no duplicate cluster (exact or near) holds two labels (label conflicts)",
        ))
    if check_groups:
        rules.append((
            gxe.ExpectColumnValuesToBeInSet(column="group_matches", value_set=true),
            "manifest.csv's group is the duplicate cluster found (re-import after editing images)",
        ))
    return rules


def check_rules(df: Any, rules: list[tuple[Any, str]]) -> list[ExpectationOutcome]:
    """Validate the facts ``df`` against ``rules`` in one GX run; one outcome per rule, with the case id and
    files of each offending row."""
    _quiet_great_expectations()
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    # Ephemeral, in-memory stores and no Data Docs site: our report is written by m2snet.
    context = gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False)),
    )

    context.variables.progress_bars = ProgressBarsConfig(globally=False)  # our own tqdm/log lines suffice
    batch = (
        context.data_sources.add_pandas("m2snet")
        .add_dataframe_asset("cases")
        .add_batch_definition_whole_dataframe("all")
        .get_batch(batch_parameters={"dataframe": df})
    )
    suite = context.suites.add(gx.ExpectationSuite(name="m2snet-dataset", expectations=[e for e, _ in rules]))
    # One validation of the whole suite; results are matched back to rules by expectation id.
    results = {
        r.expectation_config.id: r for r in batch.validate(suite, result_format={"result_format": "COMPLETE"}).results
    }
    outcomes = []
    for (_, rule), expectation in zip(rules, suite.expectations, strict=True):
        result = results[expectation.id]
        column = getattr(expectation, "column", None)
        offending = []
        if not result.success:
            for idx in sorted(set(result.result.get("unexpected_index_list") or [])):
                row = df.loc[idx]
                offending.append({"case_id": str(row["case_id"]), "files": str(row["files"])})
        outcomes.append(ExpectationOutcome(type(expectation).__name__, column, rule, bool(result.success), offending))
    return outcomes
