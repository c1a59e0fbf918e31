"""The demo: a tiny MoE checkpoint made and trained here, run through the whole job."""
