"""Host-side data: CT readers, preprocessing, templates and the Grain pipeline. Never touches JAX devices."""
