"""Training engine: data, packing, CPT/CL loops, distributed, evaluation."""
