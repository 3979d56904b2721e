import agent


def test_public_api_names_resolve_to_agent_objects() -> None:
    assert len(set(agent.__all__)) == len(agent.__all__)
    for name in agent.__all__:
        obj = getattr(agent, name)
        assert obj.__module__.startswith("agent."), name
    wanted = {"Predictor", "AgentConfig", "Installer", "PredictionEvent", "InstallEvent"}
    assert wanted <= set(agent.__all__)
