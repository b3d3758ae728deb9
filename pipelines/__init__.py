"""PMLM data layer: sources (FHIR R4, OMOP CDM, generated cohorts), canonical tables,
index encounters and the per-patient split, reference plans, workspace I/O."""
