"""Plates are the partition key; new plates are added by the sensor or the CLI."""

import dagster as dg

plates = dg.DynamicPartitionsDefinition(name="plates")
