"""Shipped hardware descriptors (YAML) and their JSON Schema; installed as the data package dioe.descriptors."""
