"""clusterlearn: clustering-based self-supervised learning on any array backend.

The core is written against the Python array API and runs on NumPy, PyTorch, JAX and CuPy
arrays; it imports no deep-learning framework. Framework glue lives in
``clusterlearn.adapters``.
"""

from . import metrics
from .assignment import nearest_centroid
from .centroid_memory import CentroidMemory
from .deepcluster import DeepClusterEpoch, DeepClusterLabeler
from .evaluation import cluster_scores, many_to_one_accuracy, odc_assign, stratified_split
from .kmeans import KMeansResult, kmeans
from .knn import knn_accuracy, knn_classify
from .linear_probe import linear_probe
from .odc import NotInitializedError, OnlineDeepClustering
from .pca import PCAWhitening, pca_whiten_l2
from .reweighting import LossReweighter, loss_weights, reweight
from .sample_memory import MemoryUpdate, SampleMemory, l2_normalize, merge_duplicates, momentum_update
from .sampler import UniformLabelSampler
from .self_classifier import SelfClassifierLoss, self_classifier_loss
from .small_clusters import SmallClusterHandler, SmallClusterStats

__version__ = "0.1.0"

__all__ = [
    "CentroidMemory",
    "DeepClusterEpoch",
    "DeepClusterLabeler",
    "KMeansResult",
    "LossReweighter",
    "MemoryUpdate",
    "NotInitializedError",
    "OnlineDeepClustering",
    "PCAWhitening",
    "SampleMemory",
    "SelfClassifierLoss",
    "SmallClusterHandler",
    "SmallClusterStats",
    "UniformLabelSampler",
    "cluster_scores",
    "kmeans",
    "knn_accuracy",
    "knn_classify",
    "l2_normalize",
    "linear_probe",
    "loss_weights",
    "many_to_one_accuracy",
    "merge_duplicates",
    "metrics",
    "momentum_update",
    "nearest_centroid",
    "odc_assign",
    "pca_whiten_l2",
    "reweight",
    "self_classifier_loss",
    "stratified_split",
]
