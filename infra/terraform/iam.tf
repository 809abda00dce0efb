# Two roles: the execution role (ECS itself: pull the image, write logs, read the secrets into the
# environment) and the task role (the application: it calls no AWS API, so it holds no policy,
# except MSK's IAM login when msk_iam_cluster_arn is set).

data "aws_iam_policy_document" "ecs_tasks_assume" {
  statement {
    actions = ["sts:AssumeRole"]
    principals {
      type        = "Service"
      identifiers = ["ecs-tasks.amazonaws.com"]
    }
    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [data.aws_caller_identity.current.account_id]
    }
  }
}

resource "aws_iam_role" "execution" {
  name               = "${var.name}-ecs-execution"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

resource "aws_iam_role_policy_attachment" "execution" {
  role       = aws_iam_role.execution.name
  policy_arn = "arn:${data.aws_partition.current.partition}:iam::aws:policy/service-role/AmazonECSTaskExecutionRolePolicy"
}

locals {
  secret_arns = distinct(values(local.secrets))
  # A Secrets Manager reference may name one key of a JSON secret (`<secret ARN>:password::`, as for
  # MSK's SCRAM secrets); IAM grants on the secret's ARN, its first seven fields.
  secretsmanager_arns = distinct([for arn in local.secret_arns : join(":", slice(split(":", arn), 0, 7))
  if strcontains(arn, ":secretsmanager:")])
  ssm_parameter_arns = [for arn in local.secret_arns : arn if strcontains(arn, ":ssm:")]
}

data "aws_iam_policy_document" "read_secrets" {
  dynamic "statement" {
    for_each = length(local.secretsmanager_arns) > 0 ? [1] : []
    content {
      sid       = "ReadTheConfiguredSecrets"
      actions   = ["secretsmanager:GetSecretValue"]
      resources = local.secretsmanager_arns
    }
  }

  dynamic "statement" {
    for_each = length(local.ssm_parameter_arns) > 0 ? [1] : []
    content {
      sid       = "ReadTheConfiguredParameters"
      actions   = ["ssm:GetParameters"]
      resources = local.ssm_parameter_arns
    }
  }

  dynamic "statement" {
    for_each = var.secrets_kms_key_arn == null ? [] : [var.secrets_kms_key_arn]
    content {
      sid       = "DecryptTheConfiguredSecrets"
      actions   = ["kms:Decrypt"]
      resources = [statement.value]
    }
  }
}

resource "aws_iam_role_policy" "execution_reads_secrets" {
  name   = "read-secrets"
  role   = aws_iam_role.execution.id
  policy = data.aws_iam_policy_document.read_secrets.json
}

resource "aws_iam_role" "task" {
  name               = "${var.name}-ecs-task"
  assume_role_policy = data.aws_iam_policy_document.ecs_tasks_assume.json
}

locals {
  # arn:<partition>:kafka:<region>:<account>:cluster/<name>/<uuid> -> its topics and groups.
  msk_topics = var.msk_iam_cluster_arn == null ? null : "${replace(var.msk_iam_cluster_arn, ":cluster/", ":topic/")}/*"
  msk_groups = var.msk_iam_cluster_arn == null ? null : "${replace(var.msk_iam_cluster_arn, ":cluster/", ":group/")}/*"
}

# What the workers and the migrate task (create-topics) do on the cluster, and nothing else.
data "aws_iam_policy_document" "msk_iam" {
  count = var.msk_iam_cluster_arn == null ? 0 : 1

  statement {
    sid       = "ConnectToTheCluster"
    actions   = ["kafka-cluster:Connect", "kafka-cluster:DescribeCluster"]
    resources = [var.msk_iam_cluster_arn]
  }
  statement {
    sid = "UseItsTopics"
    actions = ["kafka-cluster:DescribeTopic", "kafka-cluster:CreateTopic", "kafka-cluster:ReadData",
    "kafka-cluster:WriteData", "kafka-cluster:DescribeTopicDynamicConfiguration"]
    resources = [local.msk_topics]
  }
  statement {
    sid       = "UseItsConsumerGroups"
    actions   = ["kafka-cluster:AlterGroup", "kafka-cluster:DescribeGroup"]
    resources = [local.msk_groups]
  }
}

resource "aws_iam_role_policy" "task_signs_in_to_msk" {
  count  = var.msk_iam_cluster_arn == null ? 0 : 1
  name   = "msk-iam"
  role   = aws_iam_role.task.id
  policy = data.aws_iam_policy_document.msk_iam[0].json
}
