# Task definitions and services. Every service runs the same image; only the command differs.

locals {
  # No -l: the worker logs at LOG_LEVEL (default info; set it in extra_environment).
  worker_command = ["alerting-app", "worker"]

  # Services whose tasks join the consumer group, and so are bounded by the partition count. An
  # API-only (or relay-only) service runs no agent and starts no Kafka consumer.
  consuming_services = toset([
    for key, service in var.services : key
    if length(service.roles) == 0 || length(setintersection(service.roles, ["evaluate", "aggregate", "deliver"])) > 0
  ])

  container_common = {
    name                   = local.container_name
    image                  = var.image
    essential              = true
    user                   = "10001:10001" # the image's non-root user
    readonlyRootFilesystem = var.readonly_root_filesystem
    environment            = local.environment_list
    secrets                = local.secrets_list
    mountPoints            = [{ sourceVolume = "data", containerPath = local.data_dir, readOnly = false }]
    # An init process forwards SIGTERM to the worker and reaps children.
    linuxParameters = { initProcessEnabled = true }
  }

  log_configuration = {
    for key in concat(keys(var.services), ["migrate"]) : key => {
      logDriver = "awslogs"
      options = {
        awslogs-group         = aws_cloudwatch_log_group.this.name
        awslogs-region        = var.region
        awslogs-stream-prefix = key
      }
    }
  }
}

resource "aws_ecs_task_definition" "service" {
  for_each = var.services

  family = "${var.name}-${each.key}"
  # A new revision does not deregister the previous one: it stays ACTIVE, so the circuit breaker's
  # rollback and a manual `-var image=$PREVIOUS_IMAGE` have a revision to return to.
  skip_destroy             = true
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = each.value.cpu
  memory                   = each.value.memory
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = var.cpu_architecture
  }

  # Task storage for DATA_DIR (table state, rule replica). Lost with the task, rebuilt from Kafka.
  volume {
    name = "data"
  }

  container_definitions = jsonencode([merge(local.container_common, {
    command      = concat(local.worker_command, length(each.value.roles) > 0 ? ["--roles", join(",", each.value.roles)] : [])
    portMappings = [{ containerPort = var.web_port, protocol = "tcp", name = "http" }]
    healthCheck = {
      command     = local.health_check_commands[var.health_check]
      interval    = 15
      timeout     = 10 # the command gives up after 5 s itself and says why
      retries     = 4
      startPeriod = 120 # first rule-replica catch-up and consumer-group join
    }
    # Faust commits offsets and leaves the group on SIGTERM; give it time before SIGKILL.
    stopTimeout      = 60
    logConfiguration = local.log_configuration[each.key]
  })])
}

# Migrations and topic creation, run once before each deployment:
#   aws ecs run-task ... (see outputs.run_migrations_command)
# The same task definition runs any other one-off command through a command override, e.g.
#   alerting-app republish-rules | alerting-app topics | alerting-app tail alerts.new.dlq --from-beginning --limit 20
# (`tail` without --from-beginning waits for new messages: a task that would run until N more arrive)
resource "aws_ecs_task_definition" "migrate" {
  family                   = "${var.name}-migrate"
  requires_compatibilities = ["FARGATE"]
  network_mode             = "awsvpc"
  cpu                      = 256
  memory                   = 512
  execution_role_arn       = aws_iam_role.execution.arn
  task_role_arn            = aws_iam_role.task.arn

  runtime_platform {
    operating_system_family = "LINUX"
    cpu_architecture        = var.cpu_architecture
  }

  volume {
    name = "data"
  }

  # No health check: a job that exits. Its exit code is the task's (see `aws ecs describe-tasks`).
  container_definitions = jsonencode([merge(local.container_common, {
    command          = local.migrate_command
    logConfiguration = local.log_configuration["migrate"]
  })])
}

resource "aws_ecs_service" "this" {
  for_each = var.services

  name                    = each.key
  cluster                 = aws_ecs_cluster.this.id
  task_definition         = aws_ecs_task_definition.service[each.key].arn
  desired_count           = each.value.desired_count
  launch_type             = "FARGATE"
  platform_version        = "LATEST"
  propagate_tags          = "SERVICE"
  enable_ecs_managed_tags = true
  wait_for_steady_state   = var.wait_for_steady_state

  # New tasks must become healthy before old ones stop; a revision whose tasks keep failing their
  # health check stops the deployment and rolls back to the last one that completed, instead of
  # replacing tasks forever (the deployment loop of the system we replace).
  deployment_minimum_healthy_percent = 100
  deployment_maximum_percent         = 200
  deployment_circuit_breaker {
    enable   = true
    rollback = true
  }

  network_configuration {
    subnets          = var.subnet_ids
    security_groups  = [aws_security_group.tasks.id]
    assign_public_ip = var.assign_public_ip
  }

  dynamic "load_balancer" {
    for_each = each.value.target_group_arn == null ? [] : [each.value.target_group_arn]
    content {
      target_group_arn = load_balancer.value
      container_name   = local.container_name
      container_port   = var.web_port
    }
  }
  health_check_grace_period_seconds = each.value.target_group_arn == null ? null : 120

  lifecycle {
    # Application Auto Scaling owns the running count once the service exists.
    ignore_changes = [desired_count]

    precondition {
      condition     = !contains(local.consuming_services, each.key) || each.value.max_count <= var.topic_partitions
      error_message = "services.${each.key}: max_count ${each.value.max_count} exceeds topic_partitions ${var.topic_partitions}; tasks beyond the partition count would only idle in the consumer group."
    }

    # Caught at plan time, not by the first deployment's tasks exiting with "Missing configuration".
    precondition {
      condition     = length([for given in [var.redis_url != null, contains(keys(var.extra_secrets), "REDIS_URL"), contains(keys(var.extra_environment), "REDIS_URL")] : given if given]) == 1
      error_message = "REDIS_URL: set exactly one of redis_url, extra_secrets.REDIS_URL (a URL with a password) or extra_environment.REDIS_URL."
    }

    # MSK's IAM login listens on 9098; the tasks' security group lets out only kafka_ports.
    precondition {
      condition     = var.msk_iam_cluster_arn == null || contains(var.kafka_ports, 9098)
      error_message = "msk_iam_cluster_arn is set: kafka_ports must include 9098, the port of MSK's IAM login (it is ${jsonencode(var.kafka_ports)})."
    }

    # A load balancer reaches the tasks only through the API ingress rules.
    precondition {
      condition     = each.value.target_group_arn == null || length(var.api_ingress_cidr_blocks) + length(var.api_ingress_security_group_ids) > 0
      error_message = "services.${each.key}: target_group_arn is set but api_ingress_cidr_blocks and api_ingress_security_group_ids are empty; the load balancer could not reach the tasks (add its security group)."
    }

    # wait_for_steady_state returns once the service is stable, and a deployment the circuit breaker
    # rolled back is stable too (hashicorp/terraform-provider-aws#20858): without this, an apply
    # whose release never got healthy would succeed, running the previous revision.
    postcondition {
      condition     = !var.wait_for_steady_state || self.task_definition == aws_ecs_task_definition.service[each.key].arn
      error_message = "services.${each.key}: the deployment was rolled back; the service runs ${self.task_definition}, not the new revision (see its events and the stopped tasks' reasons)."
    }
  }

  depends_on = [aws_iam_role_policy.execution_reads_secrets]
}

# Every service has a scalable target: its min_count and max_count are how its count is changed (the
# service's desired_count is only the count it starts with). A CPU policy moves it between the two.
resource "aws_appautoscaling_target" "service" {
  for_each = var.services

  service_namespace  = "ecs"
  resource_id        = "service/${aws_ecs_cluster.this.name}/${aws_ecs_service.this[each.key].name}"
  scalable_dimension = "ecs:service:DesiredCount"
  min_capacity       = each.value.min_count
  max_capacity       = each.value.max_count
}

resource "aws_appautoscaling_policy" "cpu" {
  for_each = { for key, service in var.services : key => aws_appautoscaling_target.service[key] if service.max_count > service.min_count }

  name               = "${var.name}-${each.key}-cpu"
  policy_type        = "TargetTrackingScaling"
  service_namespace  = each.value.service_namespace
  resource_id        = each.value.resource_id
  scalable_dimension = each.value.scalable_dimension

  target_tracking_scaling_policy_configuration {
    target_value = var.services[each.key].cpu_target
    # Scaling in forces a rebalance of the consumer group: do it slowly.
    scale_in_cooldown  = 600
    scale_out_cooldown = 120
    predefined_metric_specification {
      predefined_metric_type = "ECSServiceAverageCPUUtilization"
    }
  }
}
