"""dinolab's reports: MLflow runs -> tidy DataFrame -> ablation tables, plots and an HTML page."""
