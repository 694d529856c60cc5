"""Pipeline stages, each callable on its own and from the ``robot-rl`` CLI: scripted collection
(:mod:`~robot_rl.stages.collect`), base-policy training (:mod:`~robot_rl.stages.train_base`), evaluation with
reports (:mod:`~robot_rl.stages.evaluation`) and the sim-to-sim transfer report (:mod:`~robot_rl.stages.transfer`)."""
