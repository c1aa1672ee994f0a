"""cifar3 training: data sources, recipes, and the train and evaluate CLIs (the serving core is ``cifar3``)."""
