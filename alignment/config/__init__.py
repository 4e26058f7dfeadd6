"""Configs: the strict loader (loader), the shared sections (sections) and one dataclass per stage (stages).

Every name is re-exported here, so `from alignment.config import SFTConfig, load_config` is the way to import.
"""
from alignment.config.loader import (apply_overrides, config_hash, ConfigError, from_dict, load_config, read_recipe,
                                     to_dict)
from alignment.config.sections import (AttnImplementation, ChatSection, DataSource, DistributedSection, Dtype,
                                       EvalSection, FineTuneSections, GenerationSection, HeldOutSide, LoggingSection,
                                       LoraSection,
                                       ModelSection, OptimSection, OutputSection, RatingThresholds,
                                       RewardJudgeSection, RewardModelRunSection, SAFETY_THRESHOLD, ScheduleSection,
                                       TrainSection)
from alignment.config.stages import (CollectConfig, CollectData, CriticSection, DEFAULT_REFUSAL_MARKERS,
                                     DPOConfig, DPOSection, EarlyStoppingSection, EvalConfig, EvalGenerationSection,
                                     EvalJudgeSection,
                                     EvalOutputSection, EvalPromptSets, GAttConfig, GAttData, GAttEvalSection,
                                     GAttSamplingSection, MarginScale, MixSection, PPOConfig, PPOData,
                                     PPORewardSection, PPOSection, PretrainConfig, PretrainData,
                                     RejectionSamplingConfig, RMAblationSection, RMConfig, RMData, RMEvalSection,
                                     RMProbeSection,
                                     RSData, RSGenerationSection, RSIteration, RSPolicySection, RSRewardSection,
                                     RSSweepSection, SafetyDistillConfig, SafetyDistillData, SafetyJudgeSection,
                                     SafetyPrepromptSection, SFTConfig, SFTData, TinyModelSection)
