"""SGLang mesh."""
