output "cluster_name" {
  description = "The ECS cluster."
  value       = aws_ecs_cluster.this.name
}

output "cluster_arn" {
  description = "The ECS cluster's ARN."
  value       = aws_ecs_cluster.this.arn
}

output "service_names" {
  description = "The ECS services, by key of var.services."
  value       = { for key, service in aws_ecs_service.this : key => service.name }
}

output "task_definition_arns" {
  description = "The services' task definition revisions (the rollback target is the previous one)."
  value       = { for key, definition in aws_ecs_task_definition.service : key => definition.arn }
}

output "migrate_task_definition_arn" {
  description = "The one-off task: migrations and topic creation; with a command override, any alerting-app command."
  value       = aws_ecs_task_definition.migrate.arn
}

output "security_group_id" {
  description = "The tasks' security group: allow it into MSK, RDS and ElastiCache."
  value       = aws_security_group.tasks.id
}

output "log_group_name" {
  description = "CloudWatch log group of every task: aws logs tail <name> --follow"
  value       = aws_cloudwatch_log_group.this.name
}

output "run_migrations_command" {
  description = "Run before each deployment; wait for exit code 0 (docs/operations.md)."
  # The family, not the revision's ARN: ECS runs its latest revision. A deploy registers the new one
  # with a targeted apply, which leaves this output as it was (it also derives from the cluster and
  # the security group, not targeted); with the ARN it named the previous revision, deregistered.
  value = join(" ", [
    "aws ecs run-task --region ${var.region} --cluster ${aws_ecs_cluster.this.name}",
    "--launch-type FARGATE --task-definition ${aws_ecs_task_definition.migrate.family}",
    "--network-configuration 'awsvpcConfiguration={subnets=[${join(",", var.subnet_ids)}],securityGroups=[${aws_security_group.tasks.id}],assignPublicIp=${var.assign_public_ip ? "ENABLED" : "DISABLED"}}'",
  ])
}
